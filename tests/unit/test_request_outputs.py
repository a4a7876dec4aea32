"""A sequence's output as the scheduler's Request produces it: deltas that add up to the whole,
stop strings cut where they start, held-back text, stop ids, eos and length."""
from __future__ import annotations

from meshlm.engine.outputs import RequestOutput
from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.tokenizer import IncrementalDetokenizer
from meshlm.sampling_params import SamplingParams

ALPHABET = "abcdefghijklmnopqrstuvwxyz .!"


class CharTokenizer:
    """Token i is the character ALPHABET[i]."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i] for i in ids)


def make_request(params: SamplingParams, eos=(), max_model_len=None) -> Request:
    detok = IncrementalDetokenizer(CharTokenizer(), [0, 1], params.skip_special_tokens)
    return Request("r", [0, 1], params, eos_token_ids=frozenset(eos), max_model_len=max_model_len,
                   detokenizer=detok)


def feed(request: Request, text: str) -> list:
    """Append the tokens of ``text`` until the request stops; the deltas taken after each token."""
    deltas = []
    for ch in text:
        status = request.append_token(ALPHABET.index(ch))
        if status is not None:
            request.status = status
        delta = request.take_output()
        if delta is not None:
            deltas.append(delta)
        if status is not None:
            break
    return deltas


def whole(deltas) -> RequestOutput:
    out = RequestOutput.accumulate(RequestOutput("r", None, [0, 1], [deltas[0]]))
    for d in deltas[1:]:
        out.add(RequestOutput("r", None, [0, 1], [d]))
    return out


def test_a_stop_string_ends_the_text_where_it_starts_and_is_never_streamed():
    request = make_request(SamplingParams(stop=["end"], max_tokens=50))
    deltas = feed(request, "hello then end of it")
    text = "".join(d.text for d in deltas)
    assert text == "hello then "
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "end"
    # While running, the last len("end") - 1 characters were held back: no delta showed "en".
    assert all("en" not in d.text or d.finish_reason for d in deltas)
    assert whole(deltas).outputs[0].text == text
    assert len(whole(deltas).outputs[0].token_ids) == len("hello then end")


def test_include_stop_str_in_output_keeps_the_stop_string():
    request = make_request(SamplingParams(stop=["!"], include_stop_str_in_output=True, max_tokens=50))
    assert "".join(d.text for d in feed(request, "wow! more")) == "wow!"


def test_stop_token_eos_and_length():
    request = make_request(SamplingParams(stop_token_ids=[ALPHABET.index("x")], max_tokens=50))
    deltas = feed(request, "abxcd")
    assert deltas[-1].stop_reason == ALPHABET.index("x") and "".join(d.text for d in deltas) == "ab"
    request = make_request(SamplingParams(max_tokens=50), eos=[ALPHABET.index(".")])
    deltas = feed(request, "hi.there")
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", None)
    request = make_request(SamplingParams(max_tokens=3))
    deltas = feed(request, "abcdef")
    assert deltas[-1].finish_reason == "length" and "".join(d.text for d in deltas) == "abc"
    request = make_request(SamplingParams(max_tokens=None), max_model_len=5)  # 2 prompt tokens
    assert "".join(d.text for d in feed(request, "abcdef")) == "abc"


def test_min_tokens_defers_eos():
    request = make_request(SamplingParams(min_tokens=3, max_tokens=50), eos=[ALPHABET.index(".")])
    deltas = feed(request, "a.b.c.d")
    assert "".join(d.text for d in deltas) == "a.b"
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_the_finish_is_handed_out_once():
    request = make_request(SamplingParams(max_tokens=1))
    (delta,) = feed(request, "a")
    assert delta.finish_reason == "length" and request.take_output() is None


def test_logprobs_accumulate_with_their_sum():
    request = make_request(SamplingParams(max_tokens=2, logprobs=1))
    request.append_token(0, {0: -0.5, 3: -1.0})
    first = request.take_output()
    request.status = request.append_token(1, {1: -0.25})
    second = request.take_output()
    out = whole([first, second]).outputs[0]
    assert out.logprobs == [{0: -0.5, 3: -1.0}, {1: -0.25}] and out.cumulative_logprob == -0.75
