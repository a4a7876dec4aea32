"""Structured outputs at tp=3 on the default model under mpiexec: every constrained answer parses
and equals the single-rank run's tokens (greedy), with the overlapped loop (tp) and the plain loop
(pp, whose last stage samples)."""
from __future__ import annotations

import json
import re

import pytest

from tests.dist.harness import LayoutRuns

pytestmark = pytest.mark.timeout(600)

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
PHONE = r"\d{3}-\d{4}"
ANSWERS = ["yes", "no", "maybe"]
PROMPTS = ["Describe a person as JSON with a name and an age.", "Write a phone number.", "Is the sky blue?"]
SPECS = [{"json": PERSON}, {"regex": PHONE}, {"choice": ANSWERS}]


@pytest.fixture(scope="module")
def structured_runs(tmp_path_factory, default_model) -> LayoutRuns:
    jobs = [{"name": "structured", "model": str(default_model), "prompts": PROMPTS, "chat": True,
             "max_tokens": 48, "logprobs": None, "ignore_eos": False, "structured_outputs": SPECS}]
    return LayoutRuns(tmp_path_factory.mktemp("structured-runs"), jobs)


def _text(model_dir, token_ids: list[int]) -> str:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).decode(token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
def test_constrained_answers_parse_and_match_one_rank(structured_runs, default_model, tp, pp):
    reference = structured_runs.get(1, 1)["structured"]
    got = structured_runs.get(tp, pp)["structured"]
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in reference]
    person, phone, answer = (_text(default_model, r["token_ids"]) for r in got)
    value = json.loads(person)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and 0 <= value["age"] <= 120, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 12, value
    assert re.fullmatch(PHONE, phone), phone
    assert answer in ANSWERS, answer
