"""logit_bias, allowed_token_ids and bad_words through the batched sampler."""
from __future__ import annotations

import numpy as np
import torch

from meshlm.executor.sampler import Sampler
from meshlm.executor.token_constraints import banned_word_tokens
from meshlm.sampling_params import SamplingParams

VOCAB = 32
EOS = 2


def _logits(num_rows: int, seed: int) -> torch.Tensor:
    return torch.randn(num_rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def _step(sampler: Sampler, logits: torch.Tensor, request_ids: list[str]) -> list[int]:
    return sampler.sample(logits, request_ids).token_ids.tolist()


def test_a_bias_forces_a_token_in_its_row_only():
    logits = _logits(3, seed=1)
    argmax = logits.argmax(dim=-1).tolist()
    target = (argmax[0] + 1) % VOCAB
    sampler = Sampler(VOCAB, [EOS])
    sampler.add_request("greedy", SamplingParams(temperature=0, logit_bias={str(target): 100}), [1])
    sampler.add_request("sampled", SamplingParams(temperature=1, logit_bias={target: 100}), [1])
    sampler.add_request("plain", SamplingParams(temperature=0), [1])
    for _ in range(20):
        assert _step(sampler, logits, ["greedy", "sampled", "plain"]) == [target, target, argmax[2]]
    # a bias of -100 on the argmax moves the greedy choice to the runner-up
    sampler.add_request("down", SamplingParams(temperature=0, logit_bias={argmax[0]: -100}), [1])
    assert _step(sampler, logits[:1], ["down"]) == [int(logits[0].argsort(descending=True)[1])]


def test_allowed_token_ids_restrict_the_choice():
    logits = _logits(2, seed=2)
    allowed = [int(t) for t in logits[0].argsort()[:3]]  # the three least likely tokens
    best_allowed = max(allowed, key=lambda t: float(logits[0, t]))
    sampler = Sampler(VOCAB, [EOS])
    sampler.add_request("greedy", SamplingParams(temperature=0, allowed_token_ids=allowed), [1])
    sampler.add_request("sampled", SamplingParams(temperature=1, allowed_token_ids=allowed, seed=4), [1])
    seen = set()
    for _ in range(50):
        greedy, sampled = _step(sampler, logits[[0, 0]], ["greedy", "sampled"])
        assert greedy == best_allowed
        seen.add(sampled)
    assert seen <= set(allowed) and len(seen) > 1, seen


def test_a_banned_word_never_appears():
    single, first, second = 5, 7, 9  # bad words: [5] and [7, 9]
    sampler = Sampler(VOCAB, [EOS])
    params = SamplingParams(temperature=1, seed=0, bad_words_token_ids=[[single], [first, second]])
    sampler.add_request("r", params, [1])
    tokens = []
    for step in range(300):
        logits = torch.zeros(1, VOCAB)
        logits[0, [single, first, second]] = 4.0  # each far likelier than any other token
        tokens += _step(sampler, logits, ["r"])
    assert single not in tokens
    assert all(not (a == first and b == second) for a, b in zip(tokens, tokens[1:])), tokens
    assert tokens.count(first) > 10 and tokens.count(second) > 10  # both still appear, just not as the word


def test_the_word_is_banned_only_after_its_prefix():
    sampler = Sampler(VOCAB, [EOS])
    sampler.add_request("r", SamplingParams(temperature=0, bad_words_token_ids=[[7, 9]]), [1])
    favour = [7, 9, 9]  # step by step the argmax: 7, then 9 (after 7: banned), then 9 again
    tokens = []
    for token in favour:
        logits = torch.zeros(1, VOCAB)
        logits[0, token], logits[0, 11] = 3.0, 1.0  # 11 is the runner-up
        tokens += _step(sampler, logits, ["r"])
    assert tokens == [7, 11, 9]


def test_banned_word_tokens():
    words = [(5,), (7, 9), (1, 2, 3)]
    assert banned_word_tokens(words, []) == [5]
    assert banned_word_tokens(words, [4, 7]) == [5, 9]
    assert banned_word_tokens(words, [1, 2]) == [5, 3]
    assert banned_word_tokens(words, [2]) == [5]
    assert np.array_equal(banned_word_tokens(words, np.array([8, 1, 2])), [5, 3])
