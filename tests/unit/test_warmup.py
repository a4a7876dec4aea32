"""The synthetic mixed steps that compile a GPU's kernels at start-up (executor/warmup.py): their
plans are well formed and fit the engine's limits, a model runs them, and nothing they leave in
the KV pool reaches a later request's logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meshlm.config import EngineConfig
from meshlm.executor import warmup
from meshlm.executor.model_runner import ModelRunner
from meshlm.executor.warmup import mixed_step_plan, warmup_plans
from meshlm.kernels.prefill_tiles import PREFILL_MIN_QUERY_LEN, num_leading_decodes
from meshlm.parallel.groups import ParallelGroups
from meshlm.protocol import StepPlan
from meshlm.weights.model_config import ModelConfig

_CFG = ModelConfig("LlamaForCausalLM", vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=4096)


def check_plan(plan: StepPlan, block_size: int, num_blocks: int) -> None:
    """Every token's position is within its sequence, each sequence's new tokens are its last ones,
    and each slot is its position's in the sequence's block table."""
    query_lens = plan.query_lens
    assert len(plan.positions) == len(plan.slot_mapping) == len(plan.input_ids) == int(query_lens.sum())
    rows = np.repeat(np.arange(plan.num_seqs), query_lens)
    ends = np.repeat(plan.seq_lens, query_lens)
    first = np.repeat(plan.seq_lens - query_lens, query_lens)
    assert ((plan.positions >= first) & (plan.positions < ends)).all()
    assert len(np.unique(np.stack([rows, plan.positions]), axis=1)[0]) == plan.num_tokens
    blocks = plan.block_tables[rows, plan.positions // block_size].astype(np.int64)
    assert (plan.slot_mapping == blocks * block_size + plan.positions % block_size).all()
    assert plan.block_tables.min() >= 0 and plan.block_tables.max() < num_blocks


def test_a_mixed_step_is_its_decodes_then_its_chunk():
    plan = mixed_step_plan(5, 40, 24, 16, 1000)
    check_plan(plan, 16, 1000)
    assert plan.query_lens.tolist() == [1] * 5 + [24]
    assert plan.seq_lens.tolist() == [40] * 5 + [24]
    assert num_leading_decodes(plan.query_lens) == 5
    assert plan.positions[:5].tolist() == [39] * 5 and plan.positions[5:].tolist() == list(range(24))
    assert len(np.unique(plan.block_tables)) == plan.block_tables.size  # the pool holds them all apart
    small = mixed_step_plan(5, 40, 24, 16, 7)  # a pool of 7 blocks: they are handed out again
    check_plan(small, 16, 7)


@pytest.mark.parametrize("max_batch_size,max_num_tokens,max_model_len", [
    (2048, 8192, 4096), (256, 8192, 4096), (2048, 2048, 4096), (64, 512, 256), (8, 8192, 96), (1, 8192, 4096)])
def test_the_plans_fit_the_engine(max_batch_size, max_num_tokens, max_model_len):
    plans = warmup_plans(max_batch_size, max_num_tokens, max_model_len, 16, 50_000)
    for plan in plans:
        check_plan(plan, 16, 50_000)
        decodes = num_leading_decodes(plan.query_lens)
        assert 0 < decodes <= max_batch_size - 1 and plan.num_seqs == decodes + 1
        assert plan.num_tokens <= max_num_tokens and plan.seq_lens.max() <= max_model_len
    if max_batch_size == 1:
        assert plans == []
        return
    counts = sorted({num_leading_decodes(p.query_lens) for p in plans})
    wanted = sorted({min(n, max_batch_size - 1, max_num_tokens - warmup.SHORT_CHUNK) for n in warmup.DECODE_COUNTS})
    assert counts == wanted
    long_chunks = [p for p in plans if p.query_lens[-1] >= PREFILL_MIN_QUERY_LEN]
    holds_long = counts[0] + PREFILL_MIN_QUERY_LEN <= max_num_tokens and max_model_len >= PREFILL_MIN_QUERY_LEN
    assert len(long_chunks) == (1 if holds_long else 0)


def test_the_fewest_decodes_are_those_the_decode_kernel_takes_apart():
    pytest.importorskip("triton")
    from meshlm.kernels.triton_attention import MIN_DECODES_APART
    assert warmup.DECODE_COUNTS[0] == MIN_DECODES_APART


def _prompt_then_decode(runner: ModelRunner, prompt: list[int], block_size: int) -> torch.Tensor:
    """Logits of a prompt's last token and of one decode after it, in blocks 0 and 1."""
    n = len(prompt)
    table = np.array([[0, 1]], dtype=np.int32)
    prefill = StepPlan(input_ids=np.array(prompt, dtype=np.int64), positions=np.arange(n, dtype=np.int64),
                       slot_mapping=np.arange(n, dtype=np.int64), query_start_loc=np.array([0, n], np.int32),
                       seq_lens=np.array([n], np.int32), block_tables=table, sample_rows=np.array([0]),
                       sample_request_ids=["a"])
    decode = StepPlan(input_ids=np.array([7], dtype=np.int64), positions=np.array([n], dtype=np.int64),
                      slot_mapping=np.array([n], dtype=np.int64), query_start_loc=np.array([0, 1], np.int32),
                      seq_lens=np.array([n + 1], np.int32), block_tables=table, sample_rows=np.array([0]),
                      sample_request_ids=["a"])
    assert n < 2 * block_size
    return torch.cat([runner.forward_logits(prefill), runner.forward_logits(decode)])


def test_a_runner_runs_the_plans_and_later_requests_see_nothing_of_them():
    config = EngineConfig.for_random_weights(_CFG, dtype="float32", max_model_len=4096)
    runner = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
    runner.allocate_kv_cache(40, 16)  # fewer blocks than the plans hand out: all of them are written
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]
    before = _prompt_then_decode(runner, prompt, 16)
    keys = runner.kv_caches[0][0][:2].clone()
    assert runner.warm_up_mixed_steps(2048, 8192) == len(warmup_plans(2048, 8192, 4096, 16, 40)) == 7
    assert not torch.equal(runner.kv_caches[0][0][:2], keys)  # the warm-up wrote into the request's blocks
    for pool in (p for kv in runner.kv_caches for p in kv):  # not into the scratch block of padding rows
        assert pool[40].abs().sum() == 0
    after = _prompt_then_decode(runner, prompt, 16)
    assert torch.equal(before, after)


def paged_attention_triton(*args):  # named as the Triton entry point; never called
    raise AssertionError


def test_only_the_triton_attention_path_warms_up():
    """The warm-up runs where kernels compile on first use: CUDA with the Triton attention. On the
    CPU or with the reference attention (which copies every sequence's keys) it would only cost."""
    config = EngineConfig.for_random_weights(_CFG, dtype="float32", max_model_len=256)
    runner = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
    assert not runner.uses_triton_attention()
    runner.device = torch.device("cuda")  # no step runs: the checks read the device's type only
    assert not runner.uses_triton_attention()  # the reference attention
    runner.attention_fn = paged_attention_triton
    assert runner.uses_triton_attention() and runner.can_capture_cuda_graphs()


def test_a_cpu_engine_starts_without_warming_up(monkeypatch, tmp_path):
    from meshlm import LLM, SamplingParams
    from tests.model_factory import make_random_model
    monkeypatch.setattr(ModelRunner, "warm_up_mixed_steps", lambda *args: pytest.fail("warmed up on the CPU"))
    llm = LLM(str(make_random_model(tmp_path / "llama", "llama")), max_model_len=128, skip_tokenizer_init=True)
    try:
        assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0].token_ids) == 2
    finally:
        llm.shutdown()
