"""CUDA graphs for the verify steps of speculative decoding.

A verify step runs each sequence's last token and its draft tokens (1 + d query tokens, d <= k =
``num_speculative_tokens``). Its graphs give every sequence exactly ``1 + k`` query tokens, for a
set of batch buckets; a plan fits when every sequence has at most ``1 + k`` query tokens (a decode
with or without drafts, or a short prefill chunk: the padding below does not depend on which), it
asks for no prompt logprobs, and its sequences fit the largest bucket.

How a plan is padded to a graph (``pad_plan``, pure numpy, checked on the CPU):

- sequence ``i`` of the plan owns graph rows ``i * (1 + k) .. i * (1 + k) + k``; its ``L`` real
  tokens come first, then ``1 + k - L`` padding rows;
- the attention kernel places query row ``j`` of a sequence at position ``seq_len - query_len + j``,
  so the sequence's length is raised by its padding rows: the real rows keep their causal
  positions, and the padding rows sit after them. They write their K/V into the scratch block (no
  request's slot) and their rotary positions are clamped below ``max_model_len``. Only they read
  keys past the sequence's own: from the plan's block-table entries, and past the plan's width
  from entries that point at the scratch block, wide enough for ``max_model_len + k`` keys;
- padding sequences (the bucket's rows past the plan's sequences) are ``1 + k`` tokens in the
  scratch block, as the decode graphs' padding rows are one;
- the sampler's logits are the graph rows of ``plan.logits_token_index()``, in its order, so the
  rejection sampler sees exactly the eager step's rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meshlm.executor.cuda_graphs import DecodeGraphRunner, default_buckets, graph_row_bytes
from meshlm.protocol import StepPlan

__all__ = ["MAX_VERIFY_GRAPH_TOKENS", "PaddedBatch", "VerifyGraphRunner", "fits_verify_graphs", "pad_plan",
           "verify_buckets", "verify_graph_memory_bytes", "verify_table_width"]

# The verify graphs cover batches of up to this many query tokens: speculation pays at small batches,
# where a step reads all the weights for a few rows; larger verify steps run eagerly.
MAX_VERIFY_GRAPH_TOKENS = 512


def verify_buckets(max_batch_size: int, num_speculative_tokens: int) -> list[int]:
    """Verify graph batch sizes: the decode buckets (``default_buckets``) cut at the largest batch
    ``B <= max_batch_size`` with ``B * (1 + k) <= MAX_VERIFY_GRAPH_TOKENS`` (at least 1)."""
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be >= 1")
    largest = min(max_batch_size, MAX_VERIFY_GRAPH_TOKENS // (1 + num_speculative_tokens))
    return default_buckets(max(1, largest))


def verify_table_width(max_model_len: int, query_len: int, block_size: int) -> int:
    """Block-table columns of a verify graph: a sequence of up to ``max_model_len`` tokens raised by
    up to ``query_len - 1`` padding rows."""
    return -(-(max_model_len + query_len - 1) // block_size)


def verify_graph_memory_bytes(max_batch_size: int, num_speculative_tokens: int, hidden_size: int,
                              intermediate_per_rank: int, vocab_per_rank: int, itemsize: int) -> int:
    """An upper estimate of what the verify graphs add to the decode graphs of buckets up to
    ``max_batch_size`` (cuda_graphs.graph_memory_bytes): they share one pool, which grows only by
    the rows the largest verify graph has beyond the largest decode graph; their own static logits
    buffer of that many rows; and a fixed allowance for the graphs themselves."""
    rows = verify_buckets(max_batch_size, num_speculative_tokens)[-1] * (1 + num_speculative_tokens)
    row_bytes = graph_row_bytes(hidden_size, intermediate_per_rank, vocab_per_rank, itemsize)
    return max(0, rows - max_batch_size) * row_bytes + rows * vocab_per_rank * itemsize + 2**27


def fits_verify_graphs(plan: StepPlan, query_len: int, max_batch: int, table_width: int) -> bool:
    """Whether ``plan`` runs in a verify graph of ``query_len`` tokens a sequence (the caller
    keeps plans with prompt logprobs out): at most ``max_batch`` sequences, none longer than
    ``query_len`` query tokens, block tables no wider than the graphs'."""
    return (0 < plan.num_seqs <= max_batch and int(plan.query_lens.max()) <= query_len
            and plan.block_tables.shape[1] <= table_width)


@dataclass(slots=True)
class PaddedBatch:
    """A plan's arrays laid out for a graph of ``batch`` sequences of ``query_len`` tokens each."""

    input_ids: np.ndarray  # [batch * query_len] int64
    positions: np.ndarray  # [batch * query_len] int64
    slot_mapping: np.ndarray  # [batch * query_len] int64
    query_start_loc: np.ndarray  # [batch + 1] int32: 0, query_len, 2 * query_len, ...
    seq_lens: np.ndarray  # [batch] int32: raised by each sequence's padding rows
    block_tables: np.ndarray  # [batch, width] int32; scratch past the plan's blocks
    token_rows: np.ndarray  # [num_tokens] int64: the graph row of each of the plan's tokens
    logits_rows: np.ndarray  # [num_logits] int64: the graph rows of plan.logits_token_index()


def pad_plan(plan: StepPlan, batch: int, query_len: int, scratch_block: int, block_size: int,
             max_model_len: int, table_width: int) -> PaddedBatch:
    """``plan`` padded to ``batch`` sequences of ``query_len`` query tokens (the module docstring
    says how); the block tables are as wide as the keys the raised lengths reach, at most
    ``table_width`` columns."""
    num_seqs, query_lens = plan.num_seqs, plan.query_lens.astype(np.int64)  # [num_seqs]
    assert num_seqs <= batch and int(query_lens.max()) <= query_len, (num_seqs, batch, query_lens, query_len)
    num_rows = batch * query_len
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)  # [num_tokens]
    token_rows = seq_of_token * query_len + np.arange(plan.num_tokens) - plan.query_start_loc[:-1][seq_of_token]
    context_lens = np.zeros(batch, dtype=np.int64)  # [batch]: the position of each sequence's first row
    context_lens[:num_seqs] = plan.seq_lens - query_lens
    positions = np.minimum(context_lens[:, None] + np.arange(query_len), max_model_len - 1).reshape(-1)
    positions[token_rows] = plan.positions  # [num_rows]
    input_ids = np.zeros(num_rows, dtype=np.int64)
    input_ids[token_rows] = plan.input_ids
    slot_mapping = np.full(num_rows, scratch_block * block_size, dtype=np.int64)
    slot_mapping[token_rows] = plan.slot_mapping
    plan_width = plan.block_tables.shape[1]
    width = min(table_width, plan_width + -(-(query_len - 1) // block_size))
    block_tables = np.full((batch, width), scratch_block, dtype=np.int32)
    block_tables[:num_seqs, :plan_width] = plan.block_tables
    return PaddedBatch(input_ids, positions, slot_mapping,
                       np.arange(0, num_rows + 1, query_len, dtype=np.int32),
                       (context_lens + query_len).astype(np.int32), block_tables, token_rows,
                       token_rows[plan.logits_token_index()])


class VerifyGraphRunner(DecodeGraphRunner):
    """Verify graphs: each of a bucket's sequences has ``1 + num_speculative_tokens`` query tokens."""

    kind = "verify"

    def __init__(self, model, groups, kv_caches, device: torch.device, buckets: list[int],
                 num_speculative_tokens: int, scratch_block: int, block_size: int, max_model_len: int):
        query_len = 1 + num_speculative_tokens
        super().__init__(model, groups, kv_caches, device, buckets,
                         verify_table_width(max_model_len, query_len, block_size), scratch_block, block_size,
                         max_model_len, query_len)

    def can_run(self, plan: StepPlan) -> bool:
        return fits_verify_graphs(plan, self.query_len, self.buckets[-1], self.max_blocks_per_seq)

    def run(self, plan: StepPlan, prev_tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits [num_logits, vocab_per_rank] of the rows of ``plan.logits_token_index()``; None on
        stages before the last and for a plan that samples nothing. ``prev_tokens`` as
        DecodeGraphRunner.run."""
        batch = self.bucket(plan.num_seqs)
        padded = pad_plan(plan, batch, self.query_len, self.scratch_block, self.block_size, self.max_model_len,
                          self.max_blocks_per_seq)
        host = self._host_sets[self.num_replays % 2]
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            array = getattr(padded, name)
            host[name][:len(array)] = torch.from_numpy(array)
        width = padded.block_tables.shape[1]
        host["block_tables"][:batch, :width] = torch.from_numpy(padded.block_tables)
        self._replay(host, batch, padded.token_rows[plan.prev_token_index], prev_tokens, width)
        if self.logits is None or len(padded.logits_rows) == 0:
            return None
        rows = torch.from_numpy(padded.logits_rows).pin_memory().to(self.device, non_blocking=True)
        return self.logits.index_select(0, rows)  # [num_logits, vocab_per_rank]
