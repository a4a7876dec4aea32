"""Assemble a rank's runtime from EngineArgs: model directory, mapping, groups, engine, and on
rank 0 the coordinator."""
from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from meshlm.parallel.experts import check_expert_layout
from meshlm.parallel.groups import ParallelGroups
from meshlm.parallel.layers import check_tp_for_heads
from meshlm.parallel.mapping import Mapping
from meshlm.config import EngineArgs
from meshlm.weights.model_config import ModelConfig
from meshlm.engine.coordinator import Coordinator
from meshlm.engine.dispatch import LocalDispatcher
from meshlm.weights.default_model import resolve_model
from meshlm.executor.model_runner import ModelRunner, resolve_dtype
from meshlm.engine.tokenizer import Tokenizer

log = logging.getLogger("meshlm")


def check_layout(cfg: ModelConfig, args: EngineArgs) -> None:
    """Fail before loading anything when the layout cannot split this model."""
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    check_tp_for_heads(cfg.num_heads, cfg.num_kv_heads, tp)
    if not cfg.is_moe or cfg.has_dense_layers:
        if cfg.intermediate_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size={cfg.intermediate_size}")
    check_moe_layout(cfg, tp, args.moe_expert_parallel_size)
    if pp > cfg.num_layers:
        raise ValueError(f"pipeline parallel size {pp} is larger than the model's {cfg.num_layers} layers")


def check_moe_layout(cfg: ModelConfig, tp: int, moe_ep: int | None) -> None:
    """Experts split by moe_ep, each expert's width by moe_tp = tp / moe_ep, a shared expert by tp."""
    if not cfg.is_moe:
        if moe_ep not in (None, 1):
            raise ValueError(f"expert parallel size {moe_ep} was given but {cfg.architecture} has no experts")
        return
    check_expert_layout(cfg.num_experts, cfg.moe_intermediate_size, tp, moe_ep or 1)
    shared = cfg.shared_expert_intermediate_size
    if shared % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide shared_expert_intermediate_size={shared}")


def eos_token_ids(model_dir: Path, cfg: ModelConfig, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def pick_device(args: EngineArgs, local_rank: int) -> torch.device:
    from meshlm.launcher import env
    name = args.device or env.get("MESHLM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"device={name!r}; choose cpu or cuda")
    return torch.device("cpu")


class RankRuntime:
    """What one rank holds: its engine, and on rank 0 the tokenizer and coordinator.

    ``phases`` (a launcher PhaseWatchdog) bounds communicator set-up and loading on every rank.
    """

    def __init__(self, args: EngineArgs, mapping: Mapping, local_rank: int = 0, world_comm=None,
                 phases=None):
        self.args = args
        self.mapping = mapping
        self._phases = phases
        self.model_dir = resolve_model(args.model)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        check_layout(self.model_config, args)
        self.tokenizer = None if args.skip_tokenizer_init else Tokenizer(self.model_dir)
        self.model_config.eos_token_ids = eos_token_ids(self.model_dir, self.model_config, self.tokenizer)
        self.max_model_len = args.max_model_len or self.model_config.max_position_embeddings
        self.device = pick_device(args, local_rank)
        dtype = resolve_dtype(args.dtype, self.model_config.torch_dtype, self.device)
        with self._phase("communicator set-up"):
            groups = ParallelGroups.single() if mapping.world_size == 1 else ParallelGroups.from_mpi(
                mapping, self.device)
        cache = args.cache_config()
        with self._phase("loading weights"):
            weights = None if args.load_format == "random" else self.model_dir
            self.engine = ModelRunner(self.model_config, groups, self.device, dtype, self.max_model_len,
                                      weights, sampler_seed=args.seed, attention_backend=args.attention_backend,
                                      enable_fused_kernels=args.enable_fused_kernels)
            local_blocks = self.engine.available_kv_blocks(cache, args.max_num_tokens)
        with self._phase("sizing the KV cache"):
            self.num_blocks = self._agree_on_blocks(local_blocks, world_comm)
            self.engine.allocate_kv_cache(self.num_blocks, cache.block_size)
        if args.enable_cuda_graphs:
            with self._phase("capturing CUDA graphs"):
                self.engine.capture_cuda_graphs(min(args.max_batch_size, 256))
        log.info("model %s: %d layers, dtype %s, device %s; KV cache %d blocks of %d tokens",
                 self.model_dir.name, self.model_config.num_layers, dtype, self.device, self.num_blocks,
                 cache.block_size)

    def _phase(self, name: str):
        return self._phases.phase(name) if self._phases is not None else nullcontext()

    @staticmethod
    def _agree_on_blocks(local_blocks: int, world_comm) -> int:
        """Every rank gets the smallest count of any rank (a collective over ``world_comm``).

        The buffer form releases the GIL while it waits (mpi4py's pickled ``allreduce`` does not),
        so this rank's monitor and watchdog keep running if a peer never arrives.
        """
        if world_comm is None:
            return local_blocks
        import numpy as np
        from mpi4py import MPI
        smallest = np.zeros(1, dtype=np.int64)
        world_comm.Allreduce(np.array([local_blocks], dtype=np.int64), smallest, op=MPI.MIN)
        return int(smallest[0])

    def make_coordinator(self, executor) -> Coordinator:
        assert self.mapping.rank == 0
        cache = self.args.cache_config()
        return Coordinator(executor, self.tokenizer, self.args.scheduler_config(), self.num_blocks,
                           cache.block_size, self.max_model_len, self.model_config.eos_token_ids,
                           self.model_config.vocab_size, cache.enable_prefix_caching)


def build_local_coordinator(args: EngineArgs) -> Coordinator:
    runtime = RankRuntime(args, Mapping())
    return runtime.make_coordinator(LocalDispatcher(runtime.engine))
