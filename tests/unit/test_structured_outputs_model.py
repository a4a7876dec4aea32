"""Structured outputs with the default model (SmolLM2-135M-Instruct, CPU): the text parses and
matches its schema, regex or choice, greedy and at temperature 1, with the overlapped loop and
with the plain one. The expectations are the constraints themselves (json, re, the choice list)."""
from __future__ import annotations

import json
import re

import pytest

from meshlm.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(600)

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
PHONE = r"\d{3}-\d{4}"
ANSWERS = ["yes", "no", "maybe"]
CASES = {  # name: (user message, structured_outputs)
    "json": ("Describe a person as JSON with a name and an age.", {"json": PERSON}),
    "regex": ("Write a phone number.", {"regex": PHONE}),
    "choice": ("Is the sky blue?", {"choice": ANSWERS}),
    "json_object": ("Give me a JSON object with one key.", {"json_object": True}),
}


def check_person(value: object) -> None:
    """PERSON's constraints, written out."""
    assert isinstance(value, dict) and set(value) == {"name", "age"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12, value
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120, value


def check_output(case: str, text: str) -> None:
    if case == "json":
        check_person(json.loads(text))
    elif case == "regex":
        assert re.fullmatch(PHONE, text), text
    elif case == "choice":
        assert text in ANSWERS, text
    else:
        assert isinstance(json.loads(text), dict), text


def _run(async_scheduling: bool, temperatures: tuple[float, ...]) -> list[tuple[str, float, object]]:
    from meshlm import LLM
    from meshlm.weights.default_model import ensure_default_model
    try:
        model = ensure_default_model()
    except RuntimeError as exc:
        pytest.skip(f"the default model is not available: {exc}")
    llm = LLM(str(model), device="cpu", max_model_len=512, num_kv_blocks=64, async_scheduling=async_scheduling)
    try:
        rows = [(case, t) for t in temperatures for case in CASES]
        params = [SamplingParams(temperature=t, seed=7, max_tokens=48, structured_outputs=CASES[case][1])
                  for case, t in rows]
        outs = llm.chat([[{"role": "user", "content": CASES[case][0]}] for case, _ in rows], params)
    finally:
        llm.shutdown()
    return [(case, t, out.outputs[0]) for (case, t), out in zip(rows, outs)]


@pytest.mark.parametrize("async_scheduling, temperatures", [(True, (0.0, 1.0)), (False, (1.0,))],
                         ids=["overlapped", "plain-loop"])
def test_output_always_parses(async_scheduling, temperatures):
    for case, temperature, out in _run(async_scheduling, temperatures):
        assert out.finish_reason == "stop", (case, temperature, out.text, out.finish_reason)
        check_output(case, out.text)
