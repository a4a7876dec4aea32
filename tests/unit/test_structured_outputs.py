"""Structured outputs without a model: the parameters' checks, the bitmask on the logits, and the
sampler driving llguidance matchers over random logits with the default model's tokenizer."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from meshlm.executor.grammar import GrammarCompiler, apply_bitmask, bitmask_words
from meshlm.executor.sampler import Sampler
from meshlm.sampling_params import SamplingParams
from meshlm.structured_outputs import StructuredOutputsParams


# --- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, words", [
    ({"regex": "[a-z]+("}, ["structured_outputs.regex", "unclosed group"]),
    ({"json": {"type": "integerx"}}, ["structured_outputs.json", "integerx"]),
    ({"json": "{not json"}, ["structured_outputs.json"]),
    ({"grammar": "start: undefined_rule"}, ["structured_outputs.grammar", "undefined_rule"]),
    ({"choice": []}, ["structured_outputs.choice"]),
    ({"choice": "yes"}, ["structured_outputs.choice"]),
    ({"regex": "a", "choice": ["a"]}, ["exactly one", "regex", "choice"]),
    ({}, ["exactly one", "got 0"]),
])
def test_bad_specs_name_what_is_wrong(fields, words):
    with pytest.raises(ValueError) as info:
        StructuredOutputsParams(**fields)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_params_travel_as_a_dict_and_keep_property_order():
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    params = SamplingParams(structured_outputs={"json": schema})
    assert isinstance(params.structured_outputs, StructuredOutputsParams)
    assert list(json.loads(params.structured_outputs.json)["properties"]) == ["z", "a"]
    wire = json.loads(json.dumps(params.to_dict()))
    assert SamplingParams.from_dict(wire) == params
    choice = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["x", "y"]))
    assert SamplingParams.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
    assert SamplingParams().to_dict()["structured_outputs"] is None
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"jsn": {}})


# --- the bitmask --------------------------------------------------------------------------------
def test_apply_bitmask_masks_exactly_the_cleared_bits():
    vocab, rng = 70, np.random.default_rng(0)
    allowed = [set(rng.choice(vocab, size=k, replace=False).tolist()) for k in (1, 5, 69)]
    bitmask = np.zeros((3, bitmask_words(vocab)), dtype=np.uint32)
    for row, ids in enumerate(allowed):
        for t in ids:
            bitmask[row, t // 32] |= np.uint32(1 << (t % 32))
    logits = torch.randn(4, vocab)
    rows = torch.tensor([0, 2, 3])  # row 1 is unconstrained
    out = apply_bitmask(logits, rows, torch.from_numpy(bitmask.view(np.int32)))
    assert torch.equal(out[1], logits[1])
    for ids, row in zip(allowed, (0, 2, 3)):
        finite = set(torch.nonzero(torch.isfinite(out[row]))[:, 0].tolist())
        assert finite == ids
        assert torch.equal(out[row, sorted(ids)], logits[row, sorted(ids)])


# --- the sampler with matchers ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_path():
    from meshlm.weights.default_model import ensure_default_model
    try:
        return ensure_default_model() / "tokenizer.json"
    except RuntimeError as exc:
        pytest.skip(f"the default model is not available: {exc}")


def _decode(path, ids: list[int]) -> str:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(path)).decode(ids, skip_special_tokens=True)


def _run(sampler: Sampler, specs: dict[str, SamplingParams], eos: int, max_steps: int = 40,
         record_each_step: bool = False) -> dict[str, list[int]]:
    """Sample every request until it draws eos, from random logits; its tokens up to eos."""
    for rid, params in specs.items():
        sampler.add_request(rid, params, [1, 2, 3])
    done: dict[str, list[int]] = {rid: [] for rid in specs}
    running = list(specs)
    for step in range(max_steps):
        if not running:
            break
        logits = torch.randn(len(running), sampler.vocab_size, generator=torch.Generator().manual_seed(step))
        sampled = sampler.sample_on_device(logits, running).token_ids.tolist()  # device tensors, unrecorded
        if record_each_step:
            sampler.output_token_ids(running[0])
        for rid, token in zip(list(running), sampled):
            done[rid].append(token)
            if token == eos:
                running.remove(rid)
    assert not running, f"no eos within {max_steps} steps: {done}"
    return done


@pytest.mark.parametrize("record_each_step", [False, True], ids=["deferred", "recorded"])
def test_sampler_output_matches_and_ends_with_eos_only_there(tokenizer_path, record_each_step):
    eos, vocab = 2, 49152
    compiler = GrammarCompiler(tokenizer_path, vocab, [eos])
    sampler = Sampler(vocab, [eos], seed=0, grammars=compiler)
    regex = r"[0-9]{3}-(ab|cd)"
    choices = ["alpha", "beta gamma", "delta"]
    specs = {"regex-greedy": SamplingParams(temperature=0, structured_outputs={"regex": regex}),
             "regex": SamplingParams(temperature=1.0, seed=3, structured_outputs={"regex": regex}),
             "choice": SamplingParams(temperature=1.0, seed=4, min_tokens=30, max_tokens=40,
                                      structured_outputs={"choice": choices}),
             "json": SamplingParams(temperature=1.0, structured_outputs={"json": {
                 "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["n"], "additionalProperties": False}}),
             "free": SamplingParams(temperature=1.0)}
    out = _run(sampler, {k: v for k, v in specs.items() if k != "free"}, eos)
    for rid, tokens in out.items():
        assert tokens.count(eos) == 1 and tokens[-1] == eos, (rid, tokens)
    assert re.fullmatch(regex, _decode(tokenizer_path, out["regex-greedy"])), out["regex-greedy"]
    assert re.fullmatch(regex, _decode(tokenizer_path, out["regex"]))
    assert _decode(tokenizer_path, out["choice"]) in choices
    value = json.loads(_decode(tokenizer_path, out["json"]))
    assert set(value) == {"n"} and isinstance(value["n"], int) and 0 <= value["n"] <= 9, value
    # Equal specs share one compiled grammar; an unconstrained row in the batch samples freely.
    assert compiler.num_compiled == 3
    sampler.add_request("free", specs["free"], [1])
    sampler.add_request("regex-2", specs["regex"], [1])
    first = sampler.sample_on_device(torch.zeros(2, vocab), ["free", "regex-2"]).token_ids.tolist()
    assert compiler.num_compiled == 3
    assert re.fullmatch("[0-9]", _decode(tokenizer_path, [first[1]])), first


def test_a_stopped_matcher_allows_only_eos_after_the_end(tokenizer_path):
    """A step already in flight when the request ended (the overlapped loop) samples eos again."""
    eos, vocab = 2, 49152
    sampler = Sampler(vocab, [eos], seed=0, grammars=GrammarCompiler(tokenizer_path, vocab, [eos]))
    out = _run(sampler, {"r": SamplingParams(temperature=0, structured_outputs={"choice": ["yes"]})}, eos)
    assert _decode(tokenizer_path, out["r"]) == "yes"
    again = sampler.sample_on_device(torch.randn(1, vocab), ["r"]).token_ids.tolist()
    assert again == [eos]


def test_sampler_without_a_tokenizer_refuses_structured_outputs():
    sampler = Sampler(16, [2], seed=0)
    with pytest.raises(ValueError, match="structured outputs"):
        sampler.add_request("r", SamplingParams(structured_outputs={"regex": "a"}), [1])


def test_a_model_vocabulary_padded_past_the_tokenizer(tokenizer_path):
    """Rows past the tokenizer's ids are never allowed; the mask covers the model's rows."""
    eos, vocab = 2, 49152 + 40
    sampler = Sampler(vocab, [eos], seed=0, grammars=GrammarCompiler(tokenizer_path, vocab, [eos]))
    sampler.add_request("r", SamplingParams(temperature=0, structured_outputs={"regex": "[0-9]+"}), [1])
    logits = torch.zeros(1, vocab)
    logits[0, 49152:] = 100.0  # padding rows that would win if they were not masked
    (token,) = sampler.sample_on_device(logits, ["r"]).token_ids.tolist()
    assert token < 49152 and re.fullmatch("[0-9]+", _decode(tokenizer_path, [token])), token
