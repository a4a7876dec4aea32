"""Verification of draft tokens keeps the target distribution exactly: with many seeded draws over a
small vocabulary, the first, second and third emitted tokens follow the target's distributions
(chi-square), through ``verify_drafts`` alone and through the Sampler with temperature and top-k;
greedy rows accept exactly while the draft is the argmax."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meshlm.executor.rejection_sampler import verify_drafts
from meshlm.executor.sampler import Sampler
from meshlm.sampling_params import SamplingParams

VOCAB = 6
NUM_DRAWS = 60_000
# The chi-square quantile of 0.9999 for 5 degrees of freedom: a correct sampler fails one seed in 10^4.
CHI2_LIMIT_5_DOF = 25.74


def chi_square(observed_tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(observed_tokens, minlength=len(probs))
    expected = probs * len(observed_tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def target_probs(seed: int) -> np.ndarray:
    """Three distinct distributions over VOCAB tokens, none tiny: [3, VOCAB]."""
    rng = np.random.default_rng(seed)
    probs = rng.uniform(0.3, 1.0, size=(3, VOCAB))
    return probs / probs.sum(axis=1, keepdims=True)


def emitted_distribution_checks(token_ids: np.ndarray, num_tokens: np.ndarray, probs: np.ndarray,
                                drafts: list[int]) -> None:
    """Token 1 ~ p0; token 2 ~ p1 given token 1 = draft 0; token 3 ~ p2 given both drafts."""
    assert chi_square(token_ids[:, 0], probs[0]) < CHI2_LIMIT_5_DOF
    after_first = num_tokens >= 2
    assert np.array_equal(after_first, token_ids[:, 0] == drafts[0])  # a second token only after an accept
    assert chi_square(token_ids[after_first, 1], probs[1]) < CHI2_LIMIT_5_DOF
    after_second = num_tokens == 3
    assert np.array_equal(after_second, after_first & (token_ids[:, 1] == drafts[1]))
    assert chi_square(token_ids[after_second, 2], probs[2]) < CHI2_LIMIT_5_DOF


@pytest.mark.parametrize("seed", [0, 1])
def test_emitted_tokens_follow_the_target(seed):
    probs = target_probs(seed)
    drafts = [int(np.argmin(probs[0])), int(np.argmax(probs[1]))]  # one unlikely, one likely draft
    generator = torch.Generator().manual_seed(seed)
    rows = torch.from_numpy(np.tile(probs, (NUM_DRAWS, 1))).float()  # [3 * NUM_DRAWS, VOCAB]
    draft_ids = torch.tensor(drafts + [0]).repeat(NUM_DRAWS)
    uniforms = torch.rand(len(rows), generator=generator)
    noise = torch.empty_like(rows).exponential_(generator=generator)
    token_ids, num_tokens, last_row = verify_drafts(
        rows, rows.argmax(-1), torch.zeros(len(rows), dtype=torch.bool), draft_ids,
        torch.full((NUM_DRAWS,), 2), uniforms, noise, max_drafts=2)
    assert token_ids.shape == (NUM_DRAWS, 3)
    assert torch.equal(last_row, torch.arange(NUM_DRAWS) * 3 + num_tokens - 1)
    emitted_distribution_checks(token_ids.numpy(), num_tokens.numpy(), probs, drafts)


def test_the_sampler_verifies_against_its_processed_distribution():
    """Temperature 0.7 and top_k=4: the target is softmax(logits / 0.7) over the 4 likeliest."""
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 1.0, size=(3, VOCAB))
    probs = np.exp(logits / 0.7)
    for row in range(3):
        probs[row, np.argsort(logits[row])[:VOCAB - 4]] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    drafts = [int(np.argsort(logits[0])[-3]), int(np.argmax(logits[1]))]  # in the top 4
    sampler = Sampler(VOCAB, eos_token_ids=[], seed=3)
    sampler.add_request("r", SamplingParams(temperature=0.7, top_k=4), [1, 2])
    num_rows = 20_000
    rows = torch.from_numpy(np.tile(logits, (num_rows, 1))).float()
    draft_ids = torch.tensor(drafts + [0]).repeat(num_rows)
    out = sampler.sample_on_device(rows, ["r"] * num_rows, np.full(num_rows, 2, np.int32), draft_ids)
    kept = probs > 0
    token_ids, num_tokens = out.token_ids.numpy(), out.num_tokens.numpy()
    for column, mask in ((0, np.ones(num_rows, bool)), (1, num_tokens >= 2), (2, num_tokens == 3)):
        observed = token_ids[mask, column]
        assert kept[column][observed].all()  # never a token top-k removed
        support = np.flatnonzero(kept[column])
        remap = np.searchsorted(support, observed)
        assert chi_square(remap, probs[column, support]) < 18.47  # 3 dof, quantile 0.9999


def test_greedy_rows_accept_while_the_draft_is_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0],  # row 0: drafts 1, 0
                           [0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])  # row 1: drafts 1, 2
    draft_ids = torch.tensor([1, 0, 0, 1, 2, 0])
    token_ids, num_tokens, _ = verify_drafts(
        torch.softmax(logits, -1), logits.argmax(-1), torch.ones(6, dtype=torch.bool), draft_ids,
        torch.tensor([2, 2]), torch.zeros(6), torch.ones(6, 3), max_drafts=2)
    assert num_tokens.tolist() == [3, 2]
    assert token_ids[0].tolist() == [1, 0, 2]  # both accepted, then the bonus argmax
    assert token_ids[1].tolist() == [1, 0, -1]  # draft 2 refused: the argmax 0 instead
