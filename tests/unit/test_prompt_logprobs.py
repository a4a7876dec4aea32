"""``prompt_logprobs`` on the default model against transformers (fp32): scored across prefill
chunks, never from a cached prefix, and only for the requests that ask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from meshlm import LLM, SamplingParams
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.plan_builder import build_step_plan
from meshlm.engine.request import Request
from meshlm.engine.scheduler import Scheduler
from meshlm.config import SchedulerConfig
from meshlm.protocol import StepResult
from meshlm.weights.default_model import ensure_default_model

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see the other side of the river."
TOP = 3
CHUNK = 8  # max_num_tokens: a prompt of 21 tokens is prefilled in three chunks


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=128, num_kv_blocks=64, max_num_tokens=CHUNK, block_size=4) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[int]:
    return llm.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def hf_logprobs(prompt_ids) -> torch.Tensor:
    """log_softmax of transformers' logits at every prompt position: [num_prompt_tokens, vocab]."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _check_against_hf(scores, prompt_ids, hf_logprobs) -> None:
    assert len(scores) == len(prompt_ids) and scores[0] is None
    for pos, entry in enumerate(scores[1:], start=1):
        token = prompt_ids[pos]
        expected = hf_logprobs[pos - 1]  # the logits before a token score it
        assert next(iter(entry)) == token  # the prompt token comes first
        assert entry[token] == pytest.approx(float(expected[token]), abs=2e-4), pos
        top_lp, top_ids = expected.topk(TOP)
        for t, lp in zip(top_ids.tolist(), top_lp.tolist()):
            assert entry[t] == pytest.approx(lp, abs=2e-4), (pos, t)
        assert len(entry) in (TOP, TOP + 1)  # the prompt token, plus it when not in the top


def test_prompt_logprobs_across_chunks_equal_transformers(llm, prompt_ids, hf_logprobs):
    assert len(prompt_ids) > 2 * CHUNK
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=TOP)
    (out,) = llm.generate([prompt_ids], params)
    _check_against_hf(out.prompt_logprobs, prompt_ids, hf_logprobs)
    plain = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=3))[0]
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(llm, prompt_ids, hf_logprobs):
    llm.engine_core.reset_prefix_cache()
    warm = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1))[0]
    assert warm.num_cached_tokens == 0
    again = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1))[0]
    assert again.num_cached_tokens > 0  # the prefix is in the cache now
    scored = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP))[0]
    assert scored.num_cached_tokens == 0
    _check_against_hf(scored.prompt_logprobs, prompt_ids, hf_logprobs)


def test_streamed_outputs_carry_the_prompt_logprobs_once(llm, prompt_ids, hf_logprobs):
    deltas = list(llm.generate_stream(prompt_ids, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=TOP),
                                      output_kind="delta"))
    carrying = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(carrying) == 1 and carrying[0] is deltas[0]
    _check_against_hf(carrying[0].prompt_logprobs, prompt_ids, hf_logprobs)


def test_n_samples_score_the_prompt_once(llm, prompt_ids, hf_logprobs):
    (out,) = llm.generate([prompt_ids], SamplingParams(n=2, temperature=1, seed=3, max_tokens=2,
                                                       prompt_logprobs=TOP))
    assert len(out.outputs) == 2
    _check_against_hf(out.prompt_logprobs, prompt_ids, hf_logprobs)


def test_only_requests_that_ask_get_prompt_rows():
    """The plan scores the prompt positions of the asking request only, each once across chunks."""
    scheduler = Scheduler(SchedulerConfig(max_num_tokens=6, max_batch_size=4), KVCacheManager(32, 4))
    asking = Request("asking", list(range(10, 20)), SamplingParams(prompt_logprobs=1))
    plain = Request("plain", list(range(30, 37)), SamplingParams())
    scheduler.add(asking)
    scheduler.add(plain)
    scored_index, scored_targets = [], []
    for _ in range(4):  # three prefill steps, then a decode
        sched = scheduler.schedule()
        chunks = sched.chunks
        plan = build_step_plan(chunks, 4, {}, [], [])
        scheduler.update_from_output(sched, StepResult(np.full(len(plan.sample_rows), 7, np.int64), None, None,
                                                       None, np.zeros(len(plan.prompt_logprob_index), np.float32)))
        tokens = plan.input_ids.tolist()
        for index, target in zip(plan.prompt_logprob_index.tolist(), plan.prompt_logprob_target_ids.tolist()):
            row = int((plan.query_start_loc[1:] > index).argmax())
            assert chunks[row].request is asking
            scored_index.append(chunks[row].start + index - int(plan.query_start_loc[row]))
            scored_targets.append(target)
            assert tokens[index] == asking.prompt_token_ids[scored_index[-1]]
    assert scored_index == list(range(9))  # positions 0..8 score tokens 1..9; position 9 samples
    assert scored_targets == asking.prompt_token_ids[1:]
    assert [next(iter(e)) for e in asking.prompt_logprobs[1:]] == asking.prompt_token_ids[1:]


@pytest.mark.parametrize("k_max", [0, 4])
def test_scores_in_slices_equal_one_log_softmax(monkeypatch, k_max):
    from meshlm.executor import prompt_logprobs
    monkeypatch.setattr(prompt_logprobs, "ROWS_PER_SLICE", 3)  # 10 rows: slices of 3, 3, 3 and 1
    gen = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(12, 8, generator=gen), torch.randn(8, 50, generator=gen)
    index, targets = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 10, 11]), torch.randint(0, 50, (10,), generator=gen)
    chosen, top_ids, top_lps = prompt_logprobs.score_prompt_tokens(hidden, index, targets, k_max,
                                                                   lambda rows: rows @ head)
    expected = torch.log_softmax(hidden[index] @ head, dim=-1)  # [10, 50]
    assert torch.allclose(chosen, expected.gather(1, targets[:, None])[:, 0], atol=1e-6)
    if k_max == 0:
        assert top_ids is None and top_lps is None
    else:
        assert torch.equal(top_ids, expected.topk(k_max).indices)
        assert torch.allclose(top_lps, expected.topk(k_max).values, atol=1e-6)
