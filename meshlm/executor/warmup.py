"""Kernels compiled at start-up for the steps of in-flight batching.

Triton compiles a kernel for each set of compile-time values it meets (launch shapes that depend
on the batch, a split of the keys or none, a float8 pool), on first use. Decode-only steps replay
CUDA graphs, compiled when they are captured, and a serving run's first prompts compile the
prefill path; but the steps that mix decodes with prefill chunks run eager, and their kernel
variants (the decode kernel for the decodes, the unified or prefill kernel for the chunks) would
compile on the first such step of the first real workload: on an H200, a 10 s benchmark of 2000
prompts of 128 lost 1.3 s to it. Every rank runs the same synthetic steps, in the same order,
before the first request (tensor- and pipeline-parallel ranks meet in their collectives as in
any step). The steps read and write KV blocks that no request holds yet; nothing is sampled.
"""
from __future__ import annotations

import numpy as np

from meshlm.kernels.prefill_tiles import PREFILL_MIN_QUERY_LEN
from meshlm.protocol import StepPlan

# Decodes of the mixed steps that warm up: from the fewest the decode kernel takes apart from the
# chunks (kernels/triton_attention.py's MIN_DECODES_APART) up to the batch's cap, each decode-tile
# size between; and keys of a short and a long context (a split of the keys or none).
DECODE_COUNTS = (32, 256, 2048)
CONTEXTS = (128, 2048)
SHORT_CHUNK = 64  # a prompt chunk below the prefill kernel's length: the unified kernel
LONG_CHUNK = PREFILL_MIN_QUERY_LEN  # the shortest chunk the prefill kernel takes


def mixed_step_plan(num_decodes: int, context: int, chunk: int, block_size: int, num_blocks: int) -> StepPlan:
    """A step of ``num_decodes`` decodes of ``context`` keys each, then one prompt chunk of ``chunk``
    tokens (the scheduler's order); blocks are handed out in turn from 0, again from 0 past
    ``num_blocks`` (several sequences then share one: the step's values are never read)."""
    seq_lens = np.array([context] * num_decodes + [chunk], dtype=np.int32)
    query_lens = np.array([1] * num_decodes + [chunk], dtype=np.int32)
    width = -(-int(seq_lens.max()) // block_size)
    tables = (np.arange(len(seq_lens) * width, dtype=np.int64).reshape(len(seq_lens), width) % num_blocks)
    # Each sequence's new tokens are its last query_lens positions.
    rows = np.repeat(np.arange(len(seq_lens)), query_lens)
    positions = np.concatenate([np.arange(s - q, s) for s, q in zip(seq_lens, query_lens)]).astype(np.int64)
    slots = tables[rows, positions // block_size] * block_size + positions % block_size
    return StepPlan(input_ids=np.zeros(len(positions), dtype=np.int64), positions=positions,
                    slot_mapping=slots.astype(np.int64),
                    query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
                    seq_lens=seq_lens, block_tables=tables.astype(np.int32),
                    sample_rows=np.zeros(0, dtype=np.int64), sample_request_ids=[])


def warmup_plans(max_batch_size: int, max_num_tokens: int, max_model_len: int, block_size: int,
                 num_blocks: int) -> list[StepPlan]:
    """The mixed steps that fit the engine's limits: decodes (``DECODE_COUNTS``, capped by the batch
    and the step's tokens) of each context in ``CONTEXTS`` that fits ``max_model_len``, with a short
    chunk; and the fewest of those decodes with a long chunk, where the step holds one."""
    plans = []
    contexts = sorted({min(c, max_model_len) for c in CONTEXTS})
    counts = sorted({min(n, max_batch_size - 1, max_num_tokens - SHORT_CHUNK) for n in DECODE_COUNTS})
    for num_decodes in (n for n in counts if n > 0):
        for context in contexts:
            plans.append(mixed_step_plan(num_decodes, context, min(SHORT_CHUNK, max_model_len), block_size, num_blocks))
    fewest = counts[0]
    if fewest > 0 and fewest + LONG_CHUNK <= max_num_tokens and LONG_CHUNK <= max_model_len:
        plans.append(mixed_step_plan(fewest, contexts[0], LONG_CHUNK, block_size, num_blocks))
    return plans
