"""Verify graphs (speculative decoding), what the CPU can check:

- a verify step padded as its CUDA graph runs it (every sequence 1 + k query tokens, padding
  sequences in the scratch block) gives, run eagerly, the real rows' logits of the unpadded step,
  for sequences of 0..k drafts, one at max_model_len; the padding writes no KV block but the scratch
  one; the real rows' positions are where the attention kernel puts them;
- the bucket rule, the eligibility of plans, and the graphs' memory estimate (also in ``meshlm plan``);
- through LLM(...): a stand-in for the verify graphs that answers the plans they would take with the
  eager forward of their padded arrays gives the plain decoding's greedy tokens.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.api.plan import plan_layout
from meshlm.config import CacheConfig, EngineArgs
from meshlm.executor import memory
from meshlm.executor.cuda_graphs import default_buckets, graph_memory_bytes
from meshlm.executor.verify_graphs import (MAX_VERIFY_GRAPH_TOKENS, fits_verify_graphs, pad_plan, verify_buckets,
                                           verify_graph_memory_bytes, verify_table_width)
from meshlm.parallel.mapping import Mapping
from meshlm.weights.model_config import ModelConfig
from tests.model_factory import make_random_model
from tests.verify_plans import eager_and_padded_logits, make_runner, padded_as_plan, verify_plan

VOCAB_SIZE, BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN, K = 320, 4, 64, 48, 4
# (tokens in the KV cache, drafts): every draft count 0..k; the last sequence ends at max_model_len,
# so its padding row would sit past it.
SEQS = [(9, 0), (14, 1), (3, 2), (21, 3), (6, 4), (MAX_MODEL_LEN - 4, 3)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=5, vocab_size=VOCAB_SIZE,
                             num_hidden_layers=2)


@pytest.mark.parametrize("batch", [len(SEQS), 8])  # 8: two padding sequences
def test_padded_verify_step_gives_the_eager_step_logits(model_path, batch):
    runner = make_runner(model_path, "cpu", NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, K, dtype="float32",
                         attention_backend="reference")
    plan = verify_plan(SEQS, NUM_BLOCKS, BLOCK_SIZE, VOCAB_SIZE, seed=1)
    expected, got, padded, same_kv = eager_and_padded_logits(runner, plan, batch, K)
    assert expected.shape == got.shape == (len(plan.logits_token_index()), VOCAB_SIZE)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert same_kv, "a padding row wrote into a block other than the scratch one"
    # The comparison can fail: the rows of one sequence shifted by one are other logits.
    assert not torch.allclose(got[1:], expected[:-1], atol=1e-2)
    runner.shutdown()


def test_real_rows_sit_where_the_kernel_places_them():
    """The Triton kernel puts query row j of a sequence at seq_len - query_len + j (the reference
    path reads the positions instead): the padded lengths must give the plan's positions."""
    plan = verify_plan(SEQS, NUM_BLOCKS, BLOCK_SIZE, VOCAB_SIZE, seed=2)
    query_len, batch = 1 + K, 8
    width = verify_table_width(MAX_MODEL_LEN, query_len, BLOCK_SIZE)
    padded = pad_plan(plan, batch, query_len, NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, width)
    rows = np.arange(batch * query_len)
    kernel_positions = padded.seq_lens[rows // query_len] - query_len + rows % query_len
    assert (kernel_positions[padded.token_rows] == plan.positions).all()
    assert (padded.input_ids[padded.token_rows] == plan.input_ids).all()
    is_pad = np.ones(len(rows), dtype=bool)
    is_pad[padded.token_rows] = False
    assert (padded.slot_mapping[is_pad] // BLOCK_SIZE == NUM_BLOCKS).all()  # the scratch block
    assert padded.positions.max() < MAX_MODEL_LEN  # rotary tables end there
    # Every key a row reads (up to its sequence's raised length) has a block-table column.
    assert padded.block_tables.shape[1] * BLOCK_SIZE >= padded.seq_lens.max()
    assert (padded.block_tables[len(SEQS):] == NUM_BLOCKS).all()
    assert (padded.block_tables[:len(SEQS), plan.block_tables.shape[1]:] == NUM_BLOCKS).all()


def test_logits_rows_follow_a_subset_of_sample_rows():
    """Rows that do not sample (a prefill chunk) and repeated rows (forks) map like the eager index."""
    plan = verify_plan([(5, 2), (8, 0), (11, 3)], NUM_BLOCKS, BLOCK_SIZE, VOCAB_SIZE, seed=3)
    plan = dataclasses.replace(plan, sample_rows=np.array([2, 0], dtype=np.int64), sample_request_ids=["2", "0"],
                               num_draft_tokens=np.array([3, 2], dtype=np.int32))
    padded = pad_plan(plan, 4, 1 + K, NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN,
                      verify_table_width(MAX_MODEL_LEN, 1 + K, BLOCK_SIZE))
    # Sequence 2's four rows (graph rows 10..13), then sequence 0's three (rows 0..2).
    assert padded.logits_rows.tolist() == [10, 11, 12, 13, 0, 1, 2]


@pytest.mark.parametrize("max_batch_size", [1, 3, 16, 100, 101, 102, 103, 256, 2048])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16, 600])
def test_verify_buckets(max_batch_size, k):
    buckets = verify_buckets(max_batch_size, k)
    largest = buckets[-1]
    assert buckets == [b for b in default_buckets(max_batch_size) if b < largest] + [largest]
    assert largest <= max_batch_size
    if largest > 1:
        assert largest * (1 + k) <= MAX_VERIFY_GRAPH_TOKENS
    # The cut is the largest batch that fits both limits.
    assert largest == max_batch_size or (largest + 1) * (1 + k) > MAX_VERIFY_GRAPH_TOKENS
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        verify_buckets(max_batch_size, 0)


def test_which_plans_fit_the_verify_graphs():
    plan = verify_plan([(5, 4), (8, 0), (11, 2)], NUM_BLOCKS, BLOCK_SIZE, VOCAB_SIZE, seed=4)
    width = plan.block_tables.shape[1]
    assert fits_verify_graphs(plan, 1 + K, 3, width)
    assert not fits_verify_graphs(plan, K, 3, width)  # one sequence has 1 + k query tokens
    assert not fits_verify_graphs(plan, 1 + K, 2, width)  # three sequences
    assert not fits_verify_graphs(plan, 1 + K, 3, width - 1)


def test_graph_memory_estimate_counts_the_verify_graphs():
    """Llama-3-8B's shape in bf16: the verify graphs add at least their own logits buffer, at most
    what graphs of their rows would take with a pool of their own; the shared pool grows only when
    the largest verify graph has more rows than the largest decode graph."""
    cfg = ModelConfig("LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192)
    mapping, shape = Mapping(world_size=1, rank=0), (4096, 14336, 128256, 2)
    logits_row = cfg.vocab_size * 2
    beyond_logits = {}
    for max_batch_size in (1, 4, 64, 256, 2048):
        plain = memory.graph_reserve_bytes(cfg, mapping, 2, max_batch_size)
        assert plain == graph_memory_bytes(max_batch_size, *shape)
        for k in (2, 4, 8):
            rows = verify_buckets(max_batch_size, k)[-1] * (1 + k)
            extra = memory.graph_reserve_bytes(cfg, mapping, 2, max_batch_size, k) - plain
            assert rows * logits_row < extra <= graph_memory_bytes(rows, *shape), (max_batch_size, k, extra)
            beyond_logits[max_batch_size, k] = (rows > max_batch_size, extra - rows * logits_row)
    held = {v for is_grown, v in beyond_logits.values() if not is_grown}
    assert len(held) == 1  # the pool holds: only the fixed allowance beyond the logits
    assert all(v > min(held) for is_grown, v in beyond_logits.values() if is_grown)
    assert beyond_logits[1, 8][0] and not beyond_logits[2048, 8][0]


class PaddedEagerRunner:
    """Answers the plans the verify graphs would take (fits_verify_graphs) with the eager forward of
    their padded arrays, picking the logits rows as VerifyGraphRunner.run does."""

    def __init__(self, runner, batch: int, k: int):
        self.runner, self.batch, self.query_len = runner, batch, 1 + k
        self.width = verify_table_width(runner.max_model_len, 1 + k, runner.block_size)
        self.num_replays = 0

    def can_run(self, plan) -> bool:
        return fits_verify_graphs(plan, self.query_len, self.batch, self.width)

    def run(self, plan, prev_tokens):
        assert prev_tokens is None  # speculative decoding runs the plain loop
        self.num_replays += 1
        padded = pad_plan(plan, self.batch, self.query_len, self.runner.num_blocks, self.runner.block_size,
                          self.runner.max_model_len, self.width)
        self.runner.verify_graph_runner = None  # the runner's own eager path, through its public method
        try:
            every_row = self.runner.forward_logits(padded_as_plan(padded))
        finally:
            self.runner.verify_graph_runner = self
        return every_row[torch.from_numpy(padded.logits_rows)]


def test_engine_with_padded_verify_steps_gives_plain_greedy_tokens(model_path):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, VOCAB_SIZE, span).tolist() * reps for span, reps in ((5, 4), (7, 3), (3, 6))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = dict(num_kv_blocks=96, block_size=BLOCK_SIZE, max_model_len=64)
    with LLM(str(model_path), **engine) as llm:
        plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    spec = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    with LLM(str(model_path), speculative_config=spec, **engine) as llm:
        runner = llm.local_model_runner()
        runner.verify_graph_runner = stand_in = PaddedEagerRunner(runner, 4, K)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        stats = llm.engine_core.spec_decode_stats
    assert outs == plain
    assert stand_in.num_replays > 0 and stats.num_accepted_tokens > 0


def test_meshlm_plan_reserves_the_verify_graphs(tmp_path):
    """``meshlm plan`` sizes the pool as the engine does: with speculative decoding the verify graphs'
    reserve comes out of it too."""
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=32768, hidden_size=2048, intermediate_size=6144,
              num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
              torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg, total = ModelConfig.from_dir(tmp_path), 8 * 2**30
    args = dict(model=str(tmp_path), max_batch_size=64)
    plain = plan_layout(EngineArgs(**args), total).ranks[0]
    spec = plan_layout(EngineArgs(**args, speculative_config={"method": "ngram", "num_speculative_tokens": 4}),
                       total).ranks[0]
    expected = memory.plan_rank(cfg, Mapping(world_size=1, rank=0), 2, total, CacheConfig(), 8192, 64,
                                with_graphs=True, num_speculative_tokens=4)
    assert spec.num_blocks == expected.num_blocks < plain.num_blocks
    assert spec.reserve_bytes - plain.reserve_bytes == verify_graph_memory_bytes(64, 4, 2048, 6144, 32768, 2)
