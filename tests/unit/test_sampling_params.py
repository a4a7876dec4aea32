from __future__ import annotations

import pickle

import numpy as np
import pytest

from meshlm.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, None, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.logprobs) == (None, 16, 0, None)
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.is_greedy and not p.uses_penalties


@pytest.mark.parametrize("field, value", [
    ("n", 0),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.5),
    ("top_k", 0),
    ("top_k", -1),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("min_tokens", -1),
    ("logprobs", 21),
    ("logprobs", -1),
    ("seed", 1.5),
    ("seed", 2**70),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", "abc"),
])
def test_invalid_value_names_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message
    if field not in ("stop", "stop_token_ids"):  # those print the whole list
        assert repr(value) in message or str(value) in message


def test_min_tokens_above_max_tokens_names_both():
    with pytest.raises(ValueError, match=r"min_tokens=17.*max_tokens=16"):
        SamplingParams(min_tokens=17)
    assert SamplingParams(min_tokens=16).min_tokens == 16
    assert SamplingParams(min_tokens=1000, max_tokens=None).min_tokens == 1000


def test_range_edges_are_accepted():
    SamplingParams(top_p=1.0, min_p=1.0, temperature=0.0, top_k=1, logprobs=20, max_tokens=1)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3, logprobs=0)
    SamplingParams(max_tokens=None, seed=-5)


def test_stop_normalised_to_tuple():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=None).stop == ()
    ids = SamplingParams(stop_token_ids=np.array([3, 7])).stop_token_ids
    assert ids == (3, 7) and all(type(t) is int for t in ids)
    assert SamplingParams(stop_token_ids=[5]).stop_token_ids == (5,)


def test_numpy_scalars_become_python_numbers():
    p = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5), top_k=np.int32(3))
    assert type(p.max_tokens) is int and type(p.top_k) is int and type(p.temperature) is float
    assert (p.max_tokens, p.top_k, p.temperature) == (4, 3, 0.5)


def test_is_greedy_and_uses_penalties():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(repetition_penalty=1.1).uses_penalties
    assert SamplingParams(presence_penalty=-0.5).uses_penalties
    assert SamplingParams(frequency_penalty=0.1).uses_penalties


def test_for_sample_derives_seeds():
    p = SamplingParams(n=3, seed=10, temperature=0.7, stop=["x"])
    samples = [p.for_sample(i) for i in range(3)]
    assert [s.seed for s in samples] == [10, 11, 12]
    assert all(s.n == 1 and s.temperature == 0.7 and s.stop == ("x",) for s in samples)
    assert p.n == 3 and p.seed == 10  # the original is unchanged
    unseeded = SamplingParams(n=2).for_sample(1)
    assert unseeded.seed is None and unseeded.n == 1
    with pytest.raises(ValueError, match="index=3"):
        p.for_sample(3)


def test_replace_revalidates():
    p = SamplingParams()
    assert p.replace(temperature=0.0).is_greedy
    with pytest.raises(ValueError, match="top_p"):
        p.replace(top_p=2.0)


def test_pickles_round_trip():
    p = SamplingParams(n=2, seed=3, stop=["a"], stop_token_ids=[1], logprobs=5)
    assert pickle.loads(pickle.dumps(p)) == p


def test_logit_bias_allowed_ids_and_bad_words_normalised():
    p = SamplingParams(logit_bias={"50": 1, 7: -100.0}, allowed_token_ids=np.array([3, 9]), bad_words="no",
                       bad_words_token_ids=[[4, 5]])
    assert p.logit_bias == {50: 1.0, 7: -100.0} and all(type(k) is int for k in p.logit_bias)
    assert p.allowed_token_ids == (3, 9) and p.bad_words == ("no",) and p.bad_words_token_ids == ((4, 5),)
    assert p.needs_output_history and not SamplingParams(logit_bias={1: 2}).needs_output_history
    assert SamplingParams.from_dict(p.to_dict()) == p


@pytest.mark.parametrize("bad, words", [
    ({"logit_bias": {5: 100.5}}, ["logit_bias: the bias 100.5 of token 5", "[-100, 100]"]),
    ({"logit_bias": {5: float("nan")}}, ["nan", "token 5"]),
    ({"logit_bias": {"x": 1}}, ["'x'", "token id"]),
    ({"logit_bias": {-1: 1}}, ["-1", "token id"]),
    ({"logit_bias": [1, 2]}, ["logit_bias=[1, 2]", "map"]),
    ({"allowed_token_ids": []}, ["allowed_token_ids=[]"]),
    ({"allowed_token_ids": [3, -2]}, ["allowed_token_ids=[3, -2]", "-2"]),
    ({"bad_words": ["ok", ""]}, ["bad_words=['ok', '']", "''"]),
    ({"bad_words_token_ids": [[1], []]}, ["bad_words_token_ids", "no token ids"]),
])
def test_logit_bias_allowed_ids_and_bad_words_validated(bad, words):
    with pytest.raises(ValueError) as info:
        SamplingParams(**bad)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


class _WordTokenizer:
    """Each character is a token id (its code point); a leading space is a token of its own."""

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return [ord(c) for c in text]


def test_bad_words_tokenized_alone_and_after_a_space():
    p = SamplingParams(bad_words=["ab", " c"]).with_bad_words_tokenized(_WordTokenizer())
    assert p.bad_words_token_ids == ((97, 98), (32, 97, 98), (99,), (32, 99))
    assert SamplingParams().with_bad_words_tokenized(None) == SamplingParams()
    with pytest.raises(ValueError, match="bad_words=\\['x'\\] need a tokenizer"):
        SamplingParams(bad_words=["x"]).with_bad_words_tokenized(None)
