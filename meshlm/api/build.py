"""Assemble one rank from the resolved EngineConfig: its device, parallel groups and model runner,
the KV pool size agreed by every rank, and on rank 0 the coordinator."""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from meshlm.config import EngineConfig, auto_max_batch_size, auto_max_num_tokens
from meshlm.engine.coordinator import Coordinator
from meshlm.engine.dispatch import StepDispatcher
from meshlm.engine.proposers import make_proposer
from meshlm.executor.memory import check_pool_holds_a_request
from meshlm.engine.tokenizer import Tokenizer
from meshlm.executor.model_runner import ModelRunner
from meshlm.parallel.groups import ParallelGroups
from meshlm.parallel.mapping import Mapping
from meshlm.weights.model_config import ModelConfig

log = logging.getLogger("meshlm")


def eos_token_ids(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """config.json's eos ids, generation_config.json's and the tokenizer's eos token."""
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def pick_device(device: str | None, local_rank: int) -> torch.device:
    """``device`` (or MESHLM_DEVICE, else cuda when present): cuda takes the node-local rank's GPU."""
    from meshlm.launcher import env
    name = device or env.get("MESHLM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device={name!r}; choose cpu or cuda")
    return torch.device("cpu")


class RankRuntime:
    """What one rank holds: its model runner and the agreed KV pool size; on rank 0 the tokenizer
    for the coordinator. ``phases`` (a launcher PhaseWatchdog) bounds communicator set-up, loading,
    sizing and graph capture on every rank, so a rank that hangs there is named."""

    def __init__(self, config: EngineConfig, mapping: Mapping, local_rank: int = 0, world_comm=None,
                 phases=None):
        self.config = config
        self.mapping = mapping
        self._phases = phases
        self.tokenizer = None if config.skip_tokenizer_init else Tokenizer(config.model_dir)
        self.eos_token_ids = eos_token_ids(config.model_dir, config.model, self.tokenizer)
        self.device = pick_device(config.device, local_rank)
        with self._phase("communicator set-up"):
            groups = ParallelGroups.single() if mapping.world_size == 1 else ParallelGroups.from_mpi(
                mapping, self.device)
        with self._phase("loading weights"):
            self.runner = ModelRunner(config, groups, self.device, self.eos_token_ids)
            # Rank 0's draft model, if any, loads before the KV pool is sized from the free memory
            self.proposer = make_proposer(config, self.device) if mapping.rank == 0 else None
        cache = config.cache
        with_graphs = config.enable_cuda_graphs and self.runner.can_capture_cuda_graphs()
        with self._phase("sizing the KV cache"):
            self.config = config = _with_max_num_tokens(config, self.device, world_comm)
            max_batch_size, self.num_blocks = self._size_batch_and_kv_pool(with_graphs, world_comm)
        # The resolved configuration: max_batch_size is a number from here on.
        self.config = dataclasses.replace(
            config, scheduler=dataclasses.replace(config.scheduler, max_batch_size=max_batch_size))
        try:  # every rank has the same minimum, so every rank refuses together
            check_pool_holds_a_request(self.num_blocks, cache.block_size, config.max_model_len, cache,
                                       self.device.type, mapping.tp)
        except ValueError:
            self.runner.shutdown()
            raise
        self.runner.allocate_kv_cache(self.num_blocks, cache.block_size)
        if with_graphs:
            with self._phase("capturing CUDA graphs"):
                self.runner.capture_cuda_graphs(max_batch_size)
        if self.runner.compiles_kernels_on_first_use():
            with self._phase("compiling the kernels of mixed steps"):
                start = time.perf_counter()
                count = self.runner.warm_up_mixed_steps(max_batch_size, config.scheduler.max_num_tokens)
                log.info("ran %d mixed steps to compile their kernels in %.1f s", count, time.perf_counter() - start)
        log.info("model %s: %d layers, dtype %s, device %s; KV cache (%s) %d blocks of %d tokens = %d tokens "
                 "(max_model_len=%d); max_batch_size %d", config.model.architecture, config.model.num_layers,
                 self.runner.dtype, self.device, self.runner.kv_cache_dtype, self.num_blocks, cache.block_size,
                 self.num_blocks * cache.block_size, config.max_model_len, max_batch_size)
        freeze_startup_heap()

    def _phase(self, name: str):
        return self._phases.phase(name) if self._phases is not None else nullcontext()

    def _size_batch_and_kv_pool(self, with_graphs: bool, world_comm) -> tuple[int, int]:
        """(max_batch_size, KV blocks), equal on every rank: an automatic max_batch_size comes from
        the pool before the batch's own reserve (graphs, sampling rows), which the pool then gives up."""
        cache, scheduler, runner = self.config.cache, self.config.scheduler, self.runner
        max_batch_size = scheduler.max_batch_size
        if max_batch_size is None:
            blocks = _min_over_ranks(runner.available_kv_blocks(cache, scheduler.max_num_tokens, 0), world_comm)
            max_batch_size = auto_max_batch_size(blocks * cache.block_size, self.device.type == "cuda")
        graphs = runner.graph_memory_reserve_bytes(max_batch_size) if with_graphs else 0
        blocks = runner.available_kv_blocks(cache, scheduler.max_num_tokens, max_batch_size, graphs)
        return max_batch_size, _min_over_ranks(blocks, world_comm)

    def make_coordinator(self, dispatcher: StepDispatcher) -> Coordinator:
        assert self.mapping.rank == 0
        return Coordinator(dispatcher, self.config, self.tokenizer, self.num_blocks, self.eos_token_ids,
                           self.proposer)


# Young objects that may pile up before the collector runs (Python's default: 700). The step loop
# allocates thousands of short-lived containers per step at large batches.
_GC_YOUNG_THRESHOLD = 50_000


def freeze_startup_heap() -> None:
    """Keep the garbage collector off the step loop's critical path: every object alive after
    start-up (modules, the model, the libraries' heaps) moves out of the collector's reach
    (``gc.freeze``), and young collections run less often. Measured on an H200 before this: at
    batch 1024 the collector took 9.3 ms of a 42 ms decode step, traversing that start-up heap."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, _GC_YOUNG_THRESHOLD), middle, old)


def _with_max_num_tokens(config: EngineConfig, device: torch.device, world_comm) -> EngineConfig:
    """``config`` with ``max_num_tokens`` a number: an automatic one from this card's memory
    (:func:`auto_max_num_tokens`), the smallest over ranks."""
    if config.scheduler.max_num_tokens is not None:
        return config
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    tokens = _min_over_ranks(auto_max_num_tokens(memory), world_comm)
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, max_num_tokens=tokens))


def _min_over_ranks(value: int, world_comm) -> int:
    """Every rank gets the smallest ``value`` of any rank (a collective over ``world_comm``).

    The buffer form releases the GIL while it waits (mpi4py's pickled ``allreduce`` does not), so
    this rank's monitor and watchdog threads keep running if a peer never arrives.
    """
    if world_comm is None:
        return value
    import numpy as np
    from mpi4py import MPI
    smallest = np.zeros(1, dtype=np.int64)
    world_comm.Allreduce(np.array([value], dtype=np.int64), smallest, op=MPI.MIN)
    return int(smallest[0])
