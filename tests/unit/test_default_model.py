"""The built-in default model (SmolLM2-135M-Instruct) through ``LLM``, against transformers on the same
directory: chat template ids, greedy tokens and text, stops, lengths, n > 1, streaming."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from meshlm import LLM, SamplingParams
from meshlm.weights.default_model import ensure_default_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EXPECTED_ANSWER = "The capital of France is Paris."
MAX_MODEL_LEN = 64
GREEDY = dict(temperature=0.0, max_tokens=32)


@pytest.fixture(scope="module")
def llm():
    # No model argument: the default model. A short context so that its limits are cheap to reach.
    with LLM(max_model_len=MAX_MODEL_LEN, num_kv_blocks=64) as engine:
        yield engine


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(ensure_default_model())


@pytest.fixture(scope="module")
def hf_prompt_ids(hf_tokenizer) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@pytest.fixture(scope="module")
def hf_answer_ids(hf_prompt_ids) -> list[int]:
    """transformers' greedy answer to QUESTION, up to and including eos."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32)
    model.eval()
    out = model.generate(torch.tensor([hf_prompt_ids]), max_new_tokens=GREEDY["max_tokens"], do_sample=False)
    return out[0, len(hf_prompt_ids):].tolist()


def test_prompt_ids_match_transformers(llm, hf_tokenizer, hf_prompt_ids):
    assert llm.tokenizer.encode_chat(QUESTION, add_generation_prompt=True) == hf_prompt_ids
    text = "Hello world! It's 2024, naïve café."
    assert llm.tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]


def test_greedy_chat_matches_transformers(llm, hf_tokenizer, hf_prompt_ids, hf_answer_ids):
    (output,) = llm.chat(QUESTION, SamplingParams(**GREEDY))
    completion = output.outputs[0]
    assert output.prompt_token_ids == hf_prompt_ids
    assert completion.token_ids == hf_answer_ids
    assert hf_answer_ids[-1] == hf_tokenizer.eos_token_id  # the answer ended by itself
    assert completion.text == EXPECTED_ANSWER
    assert (completion.finish_reason, completion.stop_reason) == ("stop", None)


def test_prompt_longer_than_the_context_is_refused(llm, hf_prompt_ids, hf_answer_ids):
    long_prompt = "one two three four five six seven eight nine ten " * 10
    num_tokens = len(llm.tokenizer.encode(long_prompt))
    assert num_tokens > MAX_MODEL_LEN
    with pytest.raises(ValueError) as err:
        llm.generate(["a short prompt", long_prompt], SamplingParams(**GREEDY))
    message = str(err.value)
    assert str(num_tokens) in message and str(MAX_MODEL_LEN) in message and "max_model_len" in message
    # The rejected call left nothing queued: the next one runs alone and as before.
    (output,) = llm.generate([hf_prompt_ids], SamplingParams(temperature=0.0, max_tokens=3))
    assert output.outputs[0].token_ids == hf_answer_ids[:3]
    assert not llm.engine_core.has_unfinished()


def test_generation_stops_at_the_context_length(llm):
    prompt = list(range(1000, 1000 + MAX_MODEL_LEN - 4))
    (output,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
    completion = output.outputs[0]
    assert len(completion.token_ids) == 4
    assert completion.finish_reason == "length"


# Stop and length variants of the same greedy answer, run together as one batch.
STOP_ID_INDEX = 3  # stop at the 4th answer token
VARIANTS = {
    "stop Paris": dict(stop=["Paris", "never appears"]),
    "stop Paris, kept": dict(stop=["never appears", "Paris"], include_stop_str_in_output=True),
    "stop across tokens": dict(stop=["France is"]),
    "max_tokens": dict(max_tokens=3),
}


@pytest.fixture(scope="module")
def variant_outputs(llm, hf_answer_ids) -> dict:
    variants = {**VARIANTS, "stop token id": dict(stop_token_ids=[hf_answer_ids[STOP_ID_INDEX]])}
    params = [SamplingParams(**{**GREEDY, **v}) for v in variants.values()]
    outputs = llm.chat([QUESTION] * len(params), params)
    return {name: out.outputs[0] for name, out in zip(variants, outputs)}


@pytest.mark.parametrize("name, text, stop_reason", [
    ("stop Paris", "The capital of France is ", "Paris"),
    ("stop Paris, kept", "The capital of France is Paris", "Paris"),
    ("stop across tokens", "The capital of ", "France is"),
])
def test_stop_strings_end_the_text(variant_outputs, name, text, stop_reason):
    completion = variant_outputs[name]
    assert completion.text == text
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_reason)


def test_stop_token_ids(variant_outputs, hf_tokenizer, hf_answer_ids):
    stop_id = hf_answer_ids[STOP_ID_INDEX]
    assert stop_id not in hf_answer_ids[:STOP_ID_INDEX]
    completion = variant_outputs["stop token id"]
    assert completion.token_ids == hf_answer_ids[:STOP_ID_INDEX + 1]  # the stop token is kept, its text not
    assert completion.text == hf_tokenizer.decode(hf_answer_ids[:STOP_ID_INDEX], skip_special_tokens=True)
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop_id)


def test_max_tokens(variant_outputs, hf_answer_ids):
    completion = variant_outputs["max_tokens"]
    assert completion.token_ids == hf_answer_ids[:3]
    assert (completion.finish_reason, completion.stop_reason) == ("length", None)


def test_n_samples_with_a_seed(llm):
    params = SamplingParams(n=2, seed=1234, temperature=1.5, max_tokens=6, ignore_eos=True)
    prompt = "Once upon a time, in a small village,"
    (first,) = llm.generate([prompt], params)
    assert [c.index for c in first.outputs] == [0, 1]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in first.outputs)
    assert first.outputs[0].token_ids != first.outputs[1].token_ids
    # Seeded: the same samples again, even beside another request.
    again, _ = llm.generate([prompt, "The weather today"], [params, SamplingParams(max_tokens=4)])
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    assert [c.text for c in again.outputs] == [c.text for c in first.outputs]


def test_stream_is_cumulative_and_ends_with_the_greedy_text(llm, hf_prompt_ids, hf_answer_ids):
    outputs = list(llm.generate_stream(hf_prompt_ids, SamplingParams(**GREEDY)))
    assert len(outputs) == len(hf_answer_ids)  # one output per generated token
    texts = [o.outputs[0].text for o in outputs]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    assert texts[-1] == EXPECTED_ANSWER
    assert outputs[-1].outputs[0].token_ids == hf_answer_ids


def test_stream_never_shows_a_stop_string(llm):
    params = SamplingParams(**GREEDY, stop=["Paris"])
    texts = [o.outputs[0].text for o in llm.generate_stream(llm.tokenizer.encode_chat(QUESTION), params)]
    assert texts[-1] == "The capital of France is "
    assert all(texts[-1].startswith(t) for t in texts)  # "P", "Par"... are held back, never shown
