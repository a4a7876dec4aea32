"""A batch larger than the sampler's slice is sampled a slice of rows at a time, with the results of
sampling it whole: the float32 copies of the logits never hold more than a slice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import meshlm.executor.sampler as sampler_module
from meshlm.executor.sampler import Sampler
from meshlm.sampling_params import SamplingParams

VOCAB = 64
SLICE = sampler_module.ROWS_PER_SLICE
NUM_ROWS = 2 * SLICE + 37  # three slices, the last one short
RACE = sampler_module.exponential_race
VERIFY = sampler_module.verify_drafts


def mixed_params(row: int) -> SamplingParams:
    """Every kind of row: seeded samples with filters, greedy with penalties, logprobs, min_tokens."""
    kind = row % 5
    if kind == 0:
        return SamplingParams(temperature=0.9, top_k=7, top_p=0.8, seed=row, logprobs=3)
    if kind == 1:
        return SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.4)
    if kind == 2:
        return SamplingParams(temperature=1.2, min_p=0.05, frequency_penalty=0.7, seed=1000 + row)
    if kind == 3:
        return SamplingParams(temperature=0.0, logprobs=1, min_tokens=2)
    return SamplingParams(temperature=0.7, seed=2000 + row, logit_bias={3: 5.0})


def run(num_steps: int, rows_per_slice: int, monkeypatch) -> tuple[list, list[int]]:
    """Each step's host result, and the rows of every float32 probability tensor the sampler made."""
    monkeypatch.setattr(sampler_module, "ROWS_PER_SLICE", rows_per_slice)
    seen: list[int] = []

    def recording_race(probs, noise):
        seen.append(probs.shape[0])
        return RACE(probs, noise)

    monkeypatch.setattr(sampler_module, "exponential_race", recording_race)
    sampler = Sampler(VOCAB, eos_token_ids=(2,), seed=0)
    ids = [f"r{row}" for row in range(NUM_ROWS)]
    for row, rid in enumerate(ids):
        sampler.add_request(rid, mixed_params(row), prompt_token_ids=[row % VOCAB, (row * 7) % VOCAB])
    generator = torch.Generator().manual_seed(5)
    results = []
    for _ in range(num_steps):
        logits = torch.randn(NUM_ROWS, VOCAB, generator=generator).to(torch.bfloat16)
        results.append(sampler.sample(logits, ids))
    return results, seen


def test_sliced_steps_equal_whole_steps(monkeypatch):
    sliced, sliced_rows = run(3, SLICE, monkeypatch)
    whole, whole_rows = run(3, NUM_ROWS, monkeypatch)
    assert max(sliced_rows) <= SLICE < max(whole_rows)
    for a, b in zip(sliced, whole):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), rtol=0, atol=1e-6)
        assert np.asarray(a.top_token_ids).tolist() == np.asarray(b.top_token_ids).tolist()


@pytest.mark.parametrize("rows_per_slice", [1, 100])
def test_any_slice_size_gives_the_same_tokens(rows_per_slice, monkeypatch):
    small, _ = run(2, rows_per_slice, monkeypatch)
    whole, _ = run(2, NUM_ROWS, monkeypatch)
    assert [r.token_ids.tolist() for r in small] == [r.token_ids.tolist() for r in whole]


def run_verify(rows_per_slice: int, monkeypatch) -> tuple[list, list[int]]:
    """Verify steps (drafts of 0 to 4 tokens a request) over seeded, greedy and logprob rows."""
    monkeypatch.setattr(sampler_module, "ROWS_PER_SLICE", rows_per_slice)
    seen: list[int] = []

    def recording_verify(probs, *args):
        seen.append(probs.shape[0])
        return VERIFY(probs, *args)

    monkeypatch.setattr(sampler_module, "verify_drafts", recording_verify)
    sampler = Sampler(VOCAB, eos_token_ids=(2,), seed=0)
    rng = np.random.default_rng(3)
    num_requests = SLICE  # about 2.5 rows a request: three slices or more
    ids = [f"v{i}" for i in range(num_requests)]
    num_drafts = np.zeros(num_requests, np.int64)
    for i, rid in enumerate(ids):
        if i % 3 == 2:  # logprobs rows carry no drafts
            params = SamplingParams(temperature=0.0, logprobs=2)
        else:
            params = SamplingParams(temperature=0.0) if i % 3 else SamplingParams(temperature=0.8, seed=i)
            num_drafts[i] = rng.integers(0, 5)
        sampler.add_request(rid, params, prompt_token_ids=[1, 2])
    generator = torch.Generator().manual_seed(9)
    results = []
    for _ in range(2):
        num_rows = int(num_drafts.sum()) + num_requests
        logits = torch.randn(num_rows, VOCAB, generator=generator)
        draft_ids = torch.randint(0, VOCAB, (num_rows,), generator=generator)
        out = sampler.sample_on_device(logits, ids, num_drafts, draft_ids)
        results.append(sampler_module.AsyncStepResult(out).get_result())
    return results, seen


def test_sliced_verify_steps_equal_whole_ones(monkeypatch):
    sliced, sliced_rows = run_verify(SLICE, monkeypatch)
    whole, whole_rows = run_verify(10**6, monkeypatch)
    assert max(sliced_rows) <= SLICE < max(whole_rows)
    for a, b in zip(sliced, whole):
        assert a.token_ids.tolist() == b.token_ids.tolist()
        assert a.num_tokens.tolist() == b.num_tokens.tolist()
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-6)
        assert a.top_token_ids.tolist() == b.top_token_ids.tolist()
