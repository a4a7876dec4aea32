"""CUDA graphs for decode steps: the whole forward (embedding to logits, TP all-reduces included)
captured once per batch-size bucket and replayed with the step's arrays copied into static
buffers. Padding rows of a bucket write their K/V into a scratch block that no request owns.
With pipeline stages, each stage captures its own part: the hand-off to the next stage (NCCL send
and recv on the stream) is inside the graph, so every stage replays its graph once per step.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from meshlm.kernels.attention import AttentionMetadata
from meshlm.protocol import StepPlan

log = logging.getLogger("meshlm")


def default_buckets(max_batch_size: int) -> list[int]:
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch_size]


class DecodeGraphRunner:
    def __init__(self, model, groups, kv_caches, device: torch.device, buckets: list[int],
                 max_blocks_per_seq: int, scratch_block: int, block_size: int, max_model_len: int):
        self.model, self.groups, self.kv_caches = model, groups, kv_caches
        self.device = device
        self.buckets = sorted(buckets)
        self.scratch_block, self.block_size = scratch_block, block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_model_len = max_model_len
        largest = self.buckets[-1]
        on = dict(device=device)
        self.input_ids = torch.zeros(largest, dtype=torch.int64, **on)
        self.positions = torch.zeros(largest, dtype=torch.int64, **on)
        self.slot_mapping = torch.full((largest,), scratch_block * block_size, dtype=torch.int64, **on)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, **on)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, **on)
        self.block_tables = torch.full((largest, max_blocks_per_seq), scratch_block, dtype=torch.int32, **on)
        self.num_replays = 0
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        # Host staging, pinned so the copies are asynchronous.
        self._host = {name: torch.empty_like(getattr(self, name), device="cpu").pin_memory()
                      for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")}

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(self.positions[:batch], self.slot_mapping[:batch], self.query_start_loc[:batch + 1],
                                 self.seq_lens[:batch], self.block_tables[:batch], 1, self.max_model_len,
                                 np.ones(batch, dtype=np.int32))

    def _forward(self, batch: int) -> torch.Tensor | None:
        mapping, model = self.groups.mapping, self.model
        if mapping.is_first_pp_rank:
            hidden = model.embed(self.input_ids[:batch])
        else:
            weight = next(model.parameters())
            hidden = self.groups.recv_from_prev_stage((batch, model.cfg.hidden_size), weight.dtype, self.device)
        hidden = model(hidden, self._meta(batch), self.kv_caches)
        if not mapping.is_last_pp_rank:
            self.groups.send_to_next_stage(hidden)
            return None
        return model.compute_logits(hidden)  # [batch, vocab_per_rank]

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for batch in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[batch] = self._forward(batch)
            self._graphs[batch] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, plan: StepPlan) -> bool:
        return (plan.num_seqs <= self.buckets[-1] and plan.num_tokens == plan.num_seqs
                and plan.block_tables.shape[1] <= self.max_blocks_per_seq)

    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """Logits [num_seqs, vocab_per_rank] of a decode plan (a view valid until the next run);
        None on stages before the last."""
        n = plan.num_seqs
        batch = next(b for b in self.buckets if b >= n)
        host = self._host
        host["input_ids"][:n] = torch.from_numpy(plan.input_ids)
        host["positions"][:n] = torch.from_numpy(plan.positions)
        host["slot_mapping"][:n] = torch.from_numpy(plan.slot_mapping)
        host["seq_lens"][:n] = torch.from_numpy(plan.seq_lens)
        width = plan.block_tables.shape[1]
        host["block_tables"][:n, :width] = torch.from_numpy(plan.block_tables)
        # Padding rows: one token in the scratch block.
        host["input_ids"][n:batch] = 0
        host["positions"][n:batch] = 0
        host["slot_mapping"][n:batch] = self.scratch_block * self.block_size
        host["seq_lens"][n:batch] = 1
        host["block_tables"][n:batch, 0] = self.scratch_block
        for name, staged in host.items():
            getattr(self, name)[:batch].copy_(staged[:batch], non_blocking=True)
        self._graphs[batch].replay()
        self.num_replays += 1
        logits = self._logits[batch]
        return None if logits is None else logits[:n]
