from __future__ import annotations

import numpy as np
import pytest
import torch

from meshlm.executor.sampler import (Sampler, apply_penalties, apply_top_k_top_p_min_p, count_tokens)
from meshlm.sampling_params import SamplingParams


def softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


def draw_many(row: torch.Tensor, params: SamplingParams, num_draws: int, seed: int = 0) -> np.ndarray:
    """Sample ``num_draws`` independent tokens for one logits row, as one batch of requests."""
    sampler = Sampler(row.shape[0], eos_token_ids=(), seed=seed)
    ids = [f"r{i}" for i in range(num_draws)]
    for rid in ids:
        sampler.add_request(rid, params, prompt_token_ids=[])
    return sampler.sample(row[None, :].expand(num_draws, -1).contiguous(), ids).token_ids


def random_row(vocab_size: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed)) * scale


def nucleus(probs: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches top_p."""
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < top_p].tolist())


def midpoint_top_p(probs: np.ndarray, size: int) -> float:
    """A top_p whose nucleus has exactly ``size`` tokens, far from any boundary."""
    cumulative = np.cumsum(np.sort(probs)[::-1])
    return float((cumulative[size - 2] + cumulative[size - 1]) / 2)


# --------------------------------------------------------------------------- filters

def test_top_k_never_leaves_the_k_largest():
    row = random_row(50, seed=1)
    tokens = draw_many(row, SamplingParams(top_k=5), 3000)
    top5 = set(np.argsort(-row.numpy())[:5].tolist())
    assert set(tokens.tolist()) == top5  # inside, and every one of them reachable


def test_top_p_never_leaves_the_nucleus():
    temperature = 0.8
    row = random_row(40, seed=2)
    probs = softmax64(row.numpy() / temperature)
    top_p = midpoint_top_p(probs, size=6)
    expected = nucleus(probs, top_p)
    assert len(expected) == 6
    tokens = draw_many(row, SamplingParams(top_p=top_p, temperature=temperature), 4000)
    assert set(tokens.tolist()) == expected


def test_min_p_keeps_tokens_above_the_scaled_top_prob():
    row = random_row(40, seed=3)
    probs = softmax64(row.numpy())
    ratio = np.sort(probs)[::-1] / probs.max()
    min_p = float((ratio[4] + ratio[5]) / 2)  # keeps exactly 5 tokens
    expected = set(np.nonzero(probs >= min_p * probs.max())[0].tolist())
    assert len(expected) == 5
    tokens = draw_many(row, SamplingParams(min_p=min_p), 3000)
    assert set(tokens.tolist()) == expected


def test_filter_mask_matches_numpy_reference_for_mixed_rows():
    vocab_size = 32
    rows = torch.stack([random_row(vocab_size, seed=10 + i, scale=2.0) for i in range(4)])
    expected_sets = []
    top_k, top_p, min_p = [], [], []
    for i, (k, nucleus_size, use_min_p) in enumerate([(None, 7, False), (8, 4, False), (3, None, False),
                                                       (None, None, True)]):
        probs = softmax64(rows[i].numpy())
        keep = set(range(vocab_size))
        if k is not None:
            keep = set(np.argsort(-probs)[:k].tolist())
            probs = np.where(np.isin(np.arange(vocab_size), list(keep)), probs, 0.0)
            probs /= probs.sum()  # top-p works on the renormalised top-k distribution
        p = 1.0 if nucleus_size is None else midpoint_top_p(probs, nucleus_size)
        keep &= nucleus(probs, p) if p < 1.0 else keep
        m = 0.0
        if use_min_p:
            ratio = np.sort(probs)[::-1] / probs.max()
            m = float((ratio[2] + ratio[3]) / 2)
            keep &= set(np.nonzero(probs >= m * probs.max())[0].tolist())
        expected_sets.append(keep)
        top_k.append(vocab_size if k is None else k)
        top_p.append(p)
        min_p.append(m)
    out = apply_top_k_top_p_min_p(rows, torch.tensor(top_k, dtype=torch.float32),
                                  torch.tensor(top_p), torch.tensor(min_p))
    for i, keep in enumerate(expected_sets):
        assert set(torch.isfinite(out[i]).nonzero()[:, 0].tolist()) == keep
        kept = sorted(keep)
        torch.testing.assert_close(out[i, kept], rows[i, kept])  # survivors untouched
    assert [len(k) for k in expected_sets] == [7, 4, 3, 3]


# --------------------------------------------------------------------------- greedy and sampling

def test_greedy_equals_argmax_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(12, 100)
    sampler = Sampler(100, eos_token_ids=[0])
    ids = [f"r{i}" for i in range(12)]
    for i, rid in enumerate(ids):
        params = SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(top_k=3, temperature=2.0)
        sampler.add_request(rid, params, [])
    tokens = sampler.sample(logits, ids).token_ids
    expected = logits.argmax(dim=-1).numpy()
    np.testing.assert_array_equal(tokens[::2], expected[::2])
    assert tokens.dtype == np.int64


def test_all_greedy_batch_takes_the_argmax_of_16_bit_logits_as_the_float32_path_does(monkeypatch):
    """A step of plain greedy rows skips the float32 copy: same tokens as the full path (ties
    included: bf16 rounding makes many equal logits), and eos is still held back by min_tokens."""
    logits = (torch.randn(64, 300, generator=torch.Generator().manual_seed(3)) * 0.01).to(torch.bfloat16)
    logits[5, 7] = logits[5, 9] = logits[5].max() + 1  # an exact tie: the first index wins on both paths
    eos = int(logits[3].float().argmax())
    ids = [f"r{i}" for i in range(64)]
    plain, mixed = Sampler(300, eos_token_ids=[eos]), Sampler(300, eos_token_ids=[eos])
    for i, rid in enumerate(ids):
        params = SamplingParams(temperature=0.0, min_tokens=2 if i == 3 else 0)
        plain.add_request(rid, SamplingParams(temperature=0.0), [])
        mixed.add_request(rid, params, [])
    with monkeypatch.context() as patch:  # the plain step never reaches the full path
        patch.setattr(Sampler, "_choose_tokens", lambda *args: pytest.fail("the full path ran"))
        fast = plain.sample(logits, ids).token_ids
    np.testing.assert_array_equal(fast, logits.float().argmax(dim=-1).numpy())
    assert fast[5] == 7 and fast[3] == eos
    full = mixed.sample(logits, ids).token_ids  # row 3's min_tokens sends the batch the float32 way
    assert full[3] != eos
    np.testing.assert_array_equal(np.delete(full, 3), np.delete(fast, 3))
    assert mixed.sample(logits, ids).token_ids[3] != eos  # one output so far: still below min_tokens
    assert mixed.sample(logits, ids).token_ids[3] == eos  # two: the plain path, eos allowed


def test_tiny_temperature_is_greedy():
    # Distinct logits 0.1 apart: at T = 1e-3 the runner-up is e^-100 times less likely.
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    row = perm.to(torch.float32) * 0.1
    tokens = draw_many(row, SamplingParams(temperature=1e-3), 500)
    assert set(tokens.tolist()) == {int(row.argmax())}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    vocab_size, num_draws = 8, 20000
    row = random_row(vocab_size, seed=5)
    tokens = draw_many(row, SamplingParams(temperature=temperature), num_draws, seed=7)
    observed = np.bincount(tokens, minlength=vocab_size)
    expected = softmax64(row.numpy() / temperature) * num_draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # df = 7: P(chi2 > 30) < 1e-4 under the right distribution


# --------------------------------------------------------------------------- seeds

def _seeded_run(logits_steps: list[torch.Tensor], params: SamplingParams, sampler_seed: int,
                num_neighbours: int, rng: np.random.Generator) -> list[int]:
    """Sample the seeded request ``target`` across steps, among random neighbours at random rows."""
    vocab_size = logits_steps[0].shape[0]
    sampler = Sampler(vocab_size, eos_token_ids=[1], seed=sampler_seed)
    sampler.add_request("target", params, [2, 3])
    neighbours = [f"n{i}" for i in range(num_neighbours)]
    for i, rid in enumerate(neighbours):
        neighbour_params = SamplingParams(temperature=float(rng.uniform(0.3, 2.0)),
                                          top_k=int(rng.integers(1, 20)), seed=None if i % 2 else 1000 + i)
        sampler.add_request(rid, neighbour_params, [])
    tokens = []
    for step_logits in logits_steps:
        ids = neighbours + ["target"]
        order = rng.permutation(len(ids))
        ids = [ids[j] for j in order]
        noise_source = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
        batch = torch.randn(len(ids), vocab_size, generator=noise_source)
        row = ids.index("target")
        batch[row] = step_logits
        tokens.append(int(sampler.sample(batch, ids).token_ids[row]))
    return tokens


def test_fixed_seed_repeats_whatever_the_batch():
    steps = [random_row(200, seed=100 + s, scale=0.5) for s in range(8)]
    params = SamplingParams(seed=1234, top_p=0.95, temperature=1.2)
    alone = _seeded_run(steps, params, sampler_seed=0, num_neighbours=0, rng=np.random.default_rng(0))
    crowded = _seeded_run(steps, params, sampler_seed=99, num_neighbours=6, rng=np.random.default_rng(1))
    crowded_again = _seeded_run(steps, params, sampler_seed=5, num_neighbours=3, rng=np.random.default_rng(2))
    assert alone == crowded == crowded_again
    other_seed = _seeded_run(steps, params.replace(seed=1235), sampler_seed=0, num_neighbours=0,
                             rng=np.random.default_rng(0))
    assert other_seed != alone  # 8 draws over ~150 tokens each: a match by chance is negligible


# --------------------------------------------------------------------------- penalties

def test_count_tokens_matches_bincount():
    lists = [[1, 1, 4], [], [0, 5, 5, 5, 2]]
    counts = count_tokens(lists, vocab_size=6)
    expected = np.stack([np.bincount(np.array(t, dtype=np.int64), minlength=6) for t in lists])
    np.testing.assert_array_equal(counts.numpy(), expected)


def test_apply_penalties_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0],
                           [2.0, -1.0, 0.5, -3.0, 1.0]])
    prompt_counts = count_tokens([[0, 1], [0, 1]], 5)
    output_counts = count_tokens([[2, 2, 3], [2, 2, 3]], 5)
    out = apply_penalties(logits, prompt_counts, output_counts, repetition=torch.tensor([2.0, 1.0]),
                          presence=torch.tensor([0.5, 0.0]), frequency=torch.tensor([0.25, 0.0]))
    # token 0: prompt, positive: 2/2. token 1: prompt, negative: -1*2.
    # token 2: output twice: 0.5/2 - 0.25*2 - 0.5. token 3: output once: -3*2 - 0.25 - 0.5. token 4: unseen.
    expected_row0 = torch.tensor([1.0, -2.0, -0.75, -6.75, 1.0])
    torch.testing.assert_close(out[0], expected_row0)
    torch.testing.assert_close(out[1], logits[1])  # no penalty: unchanged


def test_presence_penalty_counts_outputs_not_prompt():
    logits = torch.tensor([[2.0, 1.5, 0.0, 0.0]])
    sampler = Sampler(4, eos_token_ids=[3])
    sampler.add_request("a", SamplingParams(temperature=0.0, presence_penalty=2.0), [0, 0, 0])
    assert sampler.sample(logits, ["a"]).token_ids[0] == 0  # the prompt's 0s are not penalised
    assert sampler.sample(logits, ["a"]).token_ids[0] == 1  # 2.0 - 2 < 1.5 once 0 was output


def test_frequency_penalty_grows_with_count():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    sampler = Sampler(3, eos_token_ids=[2])
    sampler.add_request("a", SamplingParams(temperature=0.0, frequency_penalty=0.3), [])
    tokens = [int(sampler.sample(logits, ["a"]).token_ids[0]) for _ in range(3)]
    assert tokens == [0, 0, 1]  # 1.0 > 0.5, then 0.7 > 0.5, then 0.4 < 0.5
    assert sampler.output_token_ids("a") == [0, 0, 1]


def test_repetition_penalty_covers_the_prompt():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    sampler = Sampler(3, eos_token_ids=[2])
    sampler.add_request("rep", SamplingParams(temperature=0.0, repetition_penalty=2.0), [0])
    sampler.add_request("plain", SamplingParams(temperature=0.0), [0])
    out = sampler.sample(logits.expand(2, -1), ["rep", "plain"]).token_ids
    assert out.tolist() == [1, 0]  # 2.0 / 2 < 1.5 for the penalised request only


# --------------------------------------------------------------------------- min_tokens

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0.5, 1.0, 2.0, 9.0, 10.0]])  # eos 5 first, stop id 4 second
    sampler = Sampler(6, eos_token_ids=[5])
    sampler.add_request("min3", SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4]), [])
    sampler.add_request("free", SamplingParams(temperature=0.0, stop_token_ids=[4]), [])
    steps = [sampler.sample(logits.expand(2, -1), ["min3", "free"]).token_ids.tolist() for _ in range(4)]
    assert [s[0] for s in steps] == [3, 3, 3, 5]
    assert [s[1] for s in steps] == [5, 5, 5, 5]


def test_min_tokens_applies_to_sampled_rows():
    row = torch.tensor([0.0, 0.0, 3.0, 3.0])  # eos ids 2 and 3 hold almost all the mass
    sampler = Sampler(4, eos_token_ids=[2, 3], seed=3)
    ids = [f"r{i}" for i in range(500)]
    for rid in ids:
        sampler.add_request(rid, SamplingParams(min_tokens=1), [])
    first = sampler.sample(row.expand(500, -1).contiguous(), ids).token_ids
    assert set(first.tolist()) == {0, 1}
    second = sampler.sample(row.expand(500, -1).contiguous(), ids).token_ids
    assert {2, 3} <= set(second.tolist())


# --------------------------------------------------------------------------- logprobs

def test_logprobs_come_from_raw_logits():
    torch.manual_seed(8)
    logits = torch.randn(4, 30) * 3
    sampler = Sampler(30, eos_token_ids=[0])
    asks = [3, 0, None, 5]
    ids = [f"r{i}" for i in range(4)]
    for rid, k in zip(ids, asks):
        # Penalties and temperature change the sampling, not the reported logprobs.
        sampler.add_request(rid, SamplingParams(logprobs=k, temperature=0.7, repetition_penalty=1.5,
                                                presence_penalty=1.0), list(range(10)))
    out = sampler.sample(logits, ids)
    reference = np.log(np.stack([softmax64(r) for r in logits.numpy()]))
    np.testing.assert_allclose(out.logprobs, reference[np.arange(4), out.token_ids], rtol=1e-5, atol=1e-5)
    assert out.logprobs.dtype == np.float32
    assert out.top_token_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    for row, k in enumerate(asks):
        order = np.argsort(-reference[row])[:k or 0]
        np.testing.assert_array_equal(out.top_token_ids[row, :len(order)], order)
        np.testing.assert_allclose(out.top_logprobs[row, :len(order)], reference[row, order],
                                   rtol=1e-5, atol=1e-5)


def test_no_logprobs_unless_asked():
    sampler = Sampler(10, eos_token_ids=[0])
    sampler.add_request("a", SamplingParams(), [])
    out = sampler.sample(torch.zeros(1, 10), ["a"])
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    sampler.add_request("b", SamplingParams(logprobs=0), [])
    out = sampler.sample(torch.zeros(2, 10), ["a", "b"])
    assert out.logprobs.shape == (2,) and out.top_token_ids is None
    np.testing.assert_allclose(out.logprobs, np.full(2, -np.log(10.0)), rtol=1e-6)


# --------------------------------------------------------------------------- bookkeeping

def test_request_bookkeeping_errors():
    sampler = Sampler(10, eos_token_ids=[0])
    sampler.add_request("a", SamplingParams(), [1])
    with pytest.raises(ValueError, match="already"):
        sampler.add_request("a", SamplingParams(), [1])
    with pytest.raises(KeyError, match="'b'"):
        sampler.sample(torch.zeros(1, 10), ["b"])
    with pytest.raises(ValueError, match=r"\(2, 7\).*num_rows=1.*vocab_size=10"):
        sampler.sample(torch.zeros(2, 7), ["a"])
    with pytest.raises(ValueError, match="eos_token_ids"):
        Sampler(10, eos_token_ids=[10])
    sampler.remove_request("a")
    sampler.remove_request("a")  # unknown ids are ignored
    assert "a" not in sampler and sampler.num_requests == 0
