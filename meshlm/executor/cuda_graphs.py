"""CUDA graphs for decode steps: the whole forward (embedding to logits, TP all-reduces included)
captured once per batch-size bucket and replayed with the step's arrays copied into static
buffers. Padding rows of a bucket write their K/V into a scratch block that no request owns.
A runner's graphs give every sequence ``query_len`` query tokens: 1 for decode steps, more for the
verify steps of speculative decoding (executor/verify_graphs.py).
With pipeline stages, each stage captures its own part: the hand-off to the next stage (NCCL send
and recv on the stream) is inside the graph, so every stage replays its graph once per step.
"""
from __future__ import annotations

import bisect
import logging

import numpy as np
import torch

from meshlm.kernels.attention import AttentionMetadata
from meshlm.protocol import StepPlan

log = logging.getLogger("meshlm")


# Bucket steps: every batch size from 1 to max_batch_size runs the graph of the smallest bucket that
# holds it, so the padding is at most 7 rows up to 64, 15 up to 256, 31 up to 512, 63 beyond.
_BUCKET_STEPS = ((64, 8), (256, 16), (512, 32))
_LARGE_BUCKET_STEP = 64
# Short-context decode graphs: a decode graph bakes the attention's split count from the model's
# length (kernels/decode_attention.py), so a small batch of short sequences launches splits that
# hold no key and a merge kernel. Batches of at most SHORT_GRAPH_MAX_BATCH sequences and at least
# SHORT_GRAPH_MIN_PROGRAMS (sequence, KV head) pairs a rank also get graphs captured for contexts of
# at most 511 tokens (the longest the split rule gives one split), which a step replays when every
# sequence fits. On an H200 (Llama-3-8B shape, 128-token contexts, benchmarks/RESULTS.md) they took
# 4 to 16 sequences' steps 3-5% faster (FP8 16: 3.75 -> 3.57 ms) but 1 and 2 sequences' slower
# (FP8 1: 2.93 -> 3.07 ms: 8 or 16 programs without splits leave the card idle), hence the floor.
# set_short_context_graphs(0) turns them off.
SHORT_GRAPH_MAX_BATCH = 16
SHORT_GRAPH_MIN_PROGRAMS = 32
_SHORT_CONTEXT = {"tokens": 511}


def set_short_context_graphs(tokens: int) -> None:
    """Contexts of at most ``tokens`` get their own small-batch decode graphs in captures from now
    on (0: none). Under MPI every rank must set the same value before the engine starts: the
    graphs' tensor-parallel collectives are captured on all ranks together."""
    if tokens < 0:
        raise ValueError(f"short-context graphs: tokens={tokens} must be >= 0")
    _SHORT_CONTEXT["tokens"] = tokens


def default_buckets(max_batch_size: int) -> list[int]:
    """Decode graph batch sizes: 1, 2, 4, then every 8 to 64, every 16 to 256, every 32 to 512 and
    every 64 beyond, cut at ``max_batch_size``, which is always the last."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
    sizes, size = [1, 2, 4], 8
    while size < max_batch_size:
        sizes.append(size)
        step = next((s for limit, s in _BUCKET_STEPS if size < limit), _LARGE_BUCKET_STEP)
        size += step
    return [b for b in sizes if b < max_batch_size] + [max_batch_size]


def graph_row_bytes(hidden_size: int, intermediate_per_rank: int, vocab_per_rank: int, itemsize: int) -> int:
    """An upper estimate of what one query row of a captured graph holds on the device: its share
    of the widest activations of a layer in the graphs' pool, and of the logits (in the pool and in
    the static buffer the graph writes them into)."""
    return itemsize * (4 * intermediate_per_rank + 8 * hidden_size + 3 * vocab_per_rank)


def graph_memory_bytes(max_batch_size: int, hidden_size: int, intermediate_per_rank: int,
                       vocab_per_rank: int, itemsize: int) -> int:
    """An upper estimate of what the decode graphs of buckets up to ``max_batch_size`` hold on the
    device: one private memory pool that all graphs share (captured largest first, so it is about
    the temporaries of the largest graph: the widest activations of a layer and its logits), the
    static logits buffer every graph writes into, the static inputs, and a fixed allowance for the
    graphs themselves and the capture stream's cuBLAS workspace."""
    return max_batch_size * graph_row_bytes(hidden_size, intermediate_per_rank, vocab_per_rank, itemsize) + 2**28


class DecodeGraphRunner:
    """Decode graphs: one per batch bucket, each sequence ``query_len`` query tokens (1 here; the
    verify graphs of speculative decoding subclass it with more)."""

    kind = "decode"

    def __init__(self, model, groups, kv_caches, device: torch.device, buckets: list[int],
                 max_blocks_per_seq: int, scratch_block: int, block_size: int, max_model_len: int,
                 query_len: int = 1):
        self.model, self.groups, self.kv_caches = model, groups, kv_caches
        self.device = device
        self.buckets = sorted(buckets)
        self.scratch_block, self.block_size = scratch_block, block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_model_len = max_model_len
        self.query_len = query_len
        largest = self.buckets[-1]
        num_rows = largest * query_len
        on = dict(device=device)
        self.input_ids = torch.zeros(num_rows, dtype=torch.int64, **on)
        self.positions = torch.zeros(num_rows, dtype=torch.int64, **on)
        self.slot_mapping = torch.full((num_rows,), scratch_block * block_size, dtype=torch.int64, **on)
        self.query_start_loc = torch.arange(0, num_rows + 1, query_len, dtype=torch.int32, **on)
        self.seq_lens = torch.full((largest,), query_len, dtype=torch.int32, **on)
        self.block_tables = torch.full((largest, max_blocks_per_seq), scratch_block, dtype=torch.int32, **on)
        self.num_replays = 0
        self.replayed_batch = 0  # the bucket of the last replay (tests and logs)
        self.replayed_short = False  # whether it was a short-context graph
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Graphs of small batches for contexts of at most short_context tokens (decode runners only).
        self.short_context = min(_SHORT_CONTEXT["tokens"], max_model_len) if query_len == 1 else 0
        self._short_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None  # the graphs' memory pool, once captured (other runners may share it)
        # Every graph writes its logits into the first rows of this one buffer (allocated outside
        # the graphs' pool), so the pool holds no logits once a capture ends; None before the last stage.
        self.logits: torch.Tensor | None = None
        # Host staging, pinned so the copies are asynchronous. Two sets, used in turn: with the
        # overlapped loop the host fills step n+1's while step n's copies may not have run yet
        # (rank 0 has waited for step n-1 only, whose copies read the other set).
        self._host_sets = [{name: torch.empty_like(getattr(self, name), device="cpu").pin_memory()
                            for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")}
                           for _ in range(2)]

    @property
    def batch_sizes(self) -> list[int]:
        """The batch sizes that have a captured graph, ascending."""
        return sorted(self._graphs)

    def _meta(self, batch: int, max_seq_len: int | None = None) -> AttentionMetadata:
        rows, q = batch * self.query_len, self.query_len
        # A sequence's keys may reach query_len - 1 past max_model_len: the padding rows of a verify
        # graph raise its length (executor/verify_graphs.py).
        longest = self.max_model_len + q - 1 if max_seq_len is None else max_seq_len
        return AttentionMetadata(self.positions[:rows], self.slot_mapping[:rows], self.query_start_loc[:batch + 1],
                                 self.seq_lens[:batch], self.block_tables[:batch], q, longest,
                                 np.full(batch, q, dtype=np.int32))

    def _forward(self, batch: int, logits_out: torch.Tensor | None = None,
                 max_seq_len: int | None = None) -> torch.Tensor | None:
        """The forward of ``batch`` sequences (of at most ``max_seq_len`` keys; None: the model's
        length): their logits (into ``logits_out`` if given); None before the last stage."""
        mapping, model = self.groups.mapping, self.model
        rows = batch * self.query_len
        if mapping.is_first_pp_rank:
            hidden = model.embed(self.input_ids[:rows])
        else:
            weight = next(model.parameters())
            hidden = self.groups.recv_from_prev_stage((rows, model.cfg.hidden_size), weight.dtype, self.device)
        hidden = model(hidden, self._meta(batch, max_seq_len), self.kv_caches)
        if not mapping.is_last_pp_rank:
            self.groups.send_to_next_stage(hidden)
            return None
        return model.compute_logits(hidden, logits_out)  # [rows, vocab_per_rank]

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Capture one graph per bucket, largest first, all in one memory pool (``pool``: one that
        other graphs already use, else a new one): a smaller graph's temporaries reuse the blocks
        the larger ones freed, so the pool stays about the size of the largest graph's temporaries."""
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        # One side stream for every warm-up: the caching allocator reuses a freed block only on the
        # stream that allocated it, so a new stream per graph would keep each warm-up's blocks.
        side = torch.cuda.Stream(self.device)
        for batch in reversed(self.buckets):
            self._graphs[batch] = self._capture_one(batch, None, side)
        if self.short_context:
            kv_heads = self.model.attention_layers[0].num_kv_heads_per_rank
            for batch in reversed([b for b in self.buckets
                                   if b <= SHORT_GRAPH_MAX_BATCH and b * kv_heads >= SHORT_GRAPH_MIN_PROGRAMS]):
                self._short_graphs[batch] = self._capture_one(batch, self.short_context, side)
        torch.cuda.synchronize(self.device)
        log.info("captured %d %s CUDA graphs, batch sizes 1 to %d", len(self.buckets), self.kind, self.buckets[-1])
        log.debug("%s graph batch sizes: %s", self.kind, self.buckets)

    def _capture_one(self, batch: int, max_seq_len: int | None, side: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            warm = self._forward(batch, None, max_seq_len)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if warm is not None and self.logits is None:
            self.logits = torch.empty((self.buckets[-1] * self.query_len, warm.shape[1]), dtype=warm.dtype,
                                      device=self.device)
        del warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # the LM head writes into the static buffer
            self._forward(batch, None if self.logits is None else self.logits[:batch * self.query_len], max_seq_len)
        return graph

    def can_run(self, plan: StepPlan) -> bool:
        return (plan.num_seqs <= self.buckets[-1] and plan.num_tokens == plan.num_seqs
                and plan.block_tables.shape[1] <= self.max_blocks_per_seq)

    def bucket(self, num_seqs: int) -> int:
        """The smallest captured batch size that holds ``num_seqs`` sequences."""
        return self.buckets[bisect.bisect_left(self.buckets, num_seqs)]

    def run(self, plan: StepPlan, prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [num_seqs, vocab_per_rank] of a decode plan (a view valid until the next run);
        None on stages before the last. ``prev_tokens`` [num_prev] (on the device) fill the
        input ids at ``plan.prev_token_index``: the previous step's tokens (the overlapped loop)."""
        n = plan.num_seqs
        batch = self.bucket(n)
        host = self._host_sets[self.num_replays % 2]
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
        short = self._short_graphs.get(batch) if self._short_graphs else None
        if short is not None and int(plan.seq_lens.max()) > self.short_context:
            short = None
        self._replay(host, batch, plan.prev_token_index, prev_tokens, graph=short)
        return None if self.logits is None else self.logits[:n]

    def _replay(self, host: dict[str, torch.Tensor], batch: int, prev_token_rows: np.ndarray,
                prev_tokens: torch.Tensor | None, table_width: int | None = None,
                graph: torch.cuda.CUDAGraph | None = None) -> None:
        """Copy the first ``batch`` sequences of ``host`` (their first ``table_width`` block-table
        columns, None: all) into the static inputs, put ``prev_tokens`` into the input ids at the
        graph rows ``prev_token_rows``, and replay ``graph`` (None: the graph of ``batch``)."""
        rows = batch * self.query_len
        for name, size in (("input_ids", rows), ("positions", rows), ("slot_mapping", rows), ("seq_lens", batch)):
            getattr(self, name)[:size].copy_(host[name][:size], non_blocking=True)
        self.block_tables[:batch, :table_width].copy_(host["block_tables"][:batch, :table_width], non_blocking=True)
        if prev_tokens is not None:  # after the copy, on the same stream
            index = torch.from_numpy(prev_token_rows).pin_memory().to(self.device, non_blocking=True)
            self.input_ids.index_copy_(0, index, prev_tokens)  # [num_prev] into [largest rows]
        (graph or self._graphs[batch]).replay()
        self.num_replays += 1
        self.replayed_batch = batch
        self.replayed_short = graph is not None
