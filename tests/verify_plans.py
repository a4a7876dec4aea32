"""Verify steps (speculative decoding) padded for the verify CUDA graphs, run eagerly on the CPU or the
GPU, for the padding tests (tests/unit/test_verify_graph_padding.py, tests/gpu/test_verify_graphs_gpu.py):

    runner = make_runner(path, "cpu", NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, k=4, dtype="float32")
    plan = verify_plan([(12, 0), (30, 4)], NUM_BLOCKS, BLOCK_SIZE, vocab_size, seed=0)
    expected, got, padded, same_kv = eager_and_padded_logits(runner, plan, batch=4, k=4)
"""
from __future__ import annotations

import numpy as np
import torch

from meshlm.config import EngineArgs, EngineConfig
from meshlm.executor.model_runner import ModelRunner
from meshlm.executor.verify_graphs import PaddedBatch, pad_plan, verify_table_width
from meshlm.parallel.groups import ParallelGroups
from meshlm.protocol import StepPlan


def make_runner(path, device: str, num_blocks: int, block_size: int, max_model_len: int, k: int,
                **engine_args) -> ModelRunner:
    """A ModelRunner of ``path`` on ``device`` with speculative decoding of ``k`` tokens (``engine_args``:
    more EngineArgs), no graphs captured, its KV pool (and the scratch block) filled with random keys
    and values: a row that read a key it must not see would change."""
    args = EngineArgs(str(path), device=device, max_model_len=max_model_len,
                      speculative_config={"method": "ngram", "num_speculative_tokens": k}, **engine_args)
    runner = ModelRunner(EngineConfig.from_args(args), ParallelGroups.single(), torch.device(device))
    runner.allocate_kv_cache(num_blocks, block_size)
    gen = torch.Generator(device=device).manual_seed(0)
    for k_cache, v_cache in runner.kv_caches:
        k_cache.normal_(generator=gen)
        v_cache.normal_(generator=gen)
    return runner


def verify_plan(seqs: list[tuple[int, int]], num_blocks: int, block_size: int, vocab_size: int,
                seed: int) -> StepPlan:
    """A verify step: sequence ``i`` of ``seqs`` = (tokens already in the KV cache, drafts) runs its
    last known token and its drafts over its own random blocks; block tables are zero past a
    sequence's blocks, as the scheduler's plans are."""
    rng = np.random.default_rng(seed)
    context = np.array([c for c, _ in seqs], dtype=np.int64)
    query_lens = np.array([1 + d for _, d in seqs], dtype=np.int64)
    seq_lens = context + query_lens
    blocks = -(-seq_lens // block_size)
    order = rng.permutation(num_blocks)
    assert blocks.sum() <= num_blocks, (blocks.sum(), num_blocks)
    tables = np.zeros((len(seqs), int(blocks.max())), dtype=np.int32)
    for i, first in enumerate(np.cumsum(blocks) - blocks):
        tables[i, :blocks[i]] = order[first:first + blocks[i]]
    seq_of_token = np.repeat(np.arange(len(seqs)), query_lens)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(context, query_lens)])
    slots = tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    return StepPlan(
        input_ids=rng.integers(3, vocab_size, len(positions)).astype(np.int64), positions=positions,
        slot_mapping=slots, query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
        seq_lens=seq_lens.astype(np.int32), block_tables=tables,
        sample_rows=np.arange(len(seqs), dtype=np.int64), sample_request_ids=[str(i) for i in range(len(seqs))],
        num_draft_tokens=np.array([d for _, d in seqs], dtype=np.int32))


def padded_as_plan(padded: PaddedBatch) -> StepPlan:
    """The padded arrays as a plan whose logits are every row's (each sequence ``query_len - 1``
    drafts), for the eager forward."""
    batch = len(padded.seq_lens)
    query_len = len(padded.input_ids) // batch
    return StepPlan(padded.input_ids, padded.positions, padded.slot_mapping, padded.query_start_loc,
                    padded.seq_lens, padded.block_tables, np.arange(batch, dtype=np.int64),
                    [str(i) for i in range(batch)], num_draft_tokens=np.full(batch, query_len - 1, np.int32))


def eager_and_padded_logits(runner: ModelRunner, plan: StepPlan, batch: int, k: int):
    """The eager step's logits of ``plan`` and those of its real rows padded to ``batch`` sequences of
    ``1 + k`` tokens (from the same KV pool), the padded batch, and whether both left every KV block
    but the scratch one the same (to float32 rounding)."""
    before = [(kc.clone(), vc.clone()) for kc, vc in runner.kv_caches]
    expected = runner.forward_logits(plan)  # [num_logits, vocab]
    after_eager = [(kc.clone(), vc.clone()) for kc, vc in runner.kv_caches]
    for (kc, vc), (k0, v0) in zip(runner.kv_caches, before):
        kc.copy_(k0)
        vc.copy_(v0)
    width = verify_table_width(runner.max_model_len, 1 + k, runner.block_size)
    padded = pad_plan(plan, batch, 1 + k, runner.num_blocks, runner.block_size, runner.max_model_len, width)
    every_row = runner.forward_logits(padded_as_plan(padded))  # [batch * (1 + k), vocab]
    got = every_row[torch.from_numpy(padded.logits_rows).to(every_row.device)]
    scratch = runner.num_blocks
    # The same keys and values to rounding (the projections run over more rows)
    same_kv = all(torch.allclose(kc[:scratch].float(), ke[:scratch].float(), rtol=1e-4, atol=1e-5)
                  and torch.allclose(vc[:scratch].float(), ve[:scratch].float(), rtol=1e-4, atol=1e-5)
                  for (kc, vc), (ke, ve) in zip(runner.kv_caches, after_eager))
    return expected, got, padded, same_kv
