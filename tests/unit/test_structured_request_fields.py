"""The request fields that ask for structured outputs, mapped to StructuredOutputsParams without a
model: OpenAI's response_format, vLLM's guided_* extras and structured_outputs."""
from __future__ import annotations

import pytest

from meshlm.server.protocol import ChatCompletionRequest, CompletionRequest
from meshlm.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "[ab]+"}, StructuredOutputsParams(regex="[ab]+")),
    ({"guided_choice": ["x", "y"]}, StructuredOutputsParams(choice=["x", "y"])),
    ({"guided_grammar": 'start: "a"'}, StructuredOutputsParams(grammar='start: "a"')),
    ({"structured_outputs": {"regex": "a"}}, StructuredOutputsParams(regex="a")),
])
def test_fields_map_to_one_constraint(fields, expected):
    assert _chat(**fields).sampling_params().structured_outputs == expected
    assert CompletionRequest(prompt="hi", **fields).sampling_params().structured_outputs == expected


@pytest.mark.parametrize("fields, starts", [
    ({"response_format": {"type": "xml"}}, "response_format: type 'xml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format: type 'json_schema' needs"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_json: give one way"),
    ({"guided_regex": "("}, "guided_regex: structured_outputs.regex"),
    ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs: structured_outputs needs exactly one"),
])
def test_bad_fields_name_themselves(fields, starts):
    with pytest.raises(ValueError) as info:
        _chat(**fields).sampling_params()
    assert str(info.value).startswith(starts), str(info.value)


def test_a_required_tool_call_cannot_also_take_a_response_format():
    tool = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    body = _chat(tools=[tool], tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="^tool_choice: "):
        body.sampling_params(body.tool_mode(False, None))
    named = _chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.sampling_params(named.tool_mode(False, None)).structured_outputs == StructuredOutputsParams(json=SCHEMA)
