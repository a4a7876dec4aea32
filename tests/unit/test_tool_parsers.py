"""Tool calling without a model: tool_choice resolution, the JSON schemas of required and named
calls, the hermes and llama3_json parsers on stand-in outputs, and the streamed deltas."""
from __future__ import annotations

import json

import pytest

from meshlm.server.tool_stream import ToolCallStream
from meshlm.server.tools import ToolOptions, parse_tool_calls, tool_mode

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}


def _calls(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_finds_calls_after_text_and_an_unclosed_last_one():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}')
    content, calls = parse_tool_calls("hermes", text)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert parse_tool_calls("hermes", "No tools needed.") == ("No tools needed.", [])
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls("hermes", broken) == (broken, [])


def test_llama3_json_finds_one_or_several_calls():
    content, calls = parse_tool_calls("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert content is None and _calls(calls) == [("get_weather", {"city": "Oslo"})]
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
            '{"name": "get_time", "parameters": {}}')
    assert _calls(parse_tool_calls("llama3_json", text)[1]) == [("get_weather", {"city": "Rome"}),
                                                                ("get_time", {})]
    for text in ("The answer is 4.", '{"city": "no name"}', '{"name": "f", "parameters": {"a": 1}} trailing'):
        assert parse_tool_calls("llama3_json", text) == (text, [])


def test_tool_choice_resolution_and_errors():
    tools = [WEATHER, TIME]
    assert tool_mode(None, None, True, False, None).kind == "none"
    named = tool_mode(tools, {"type": "function", "function": {"name": "get_time"}}, True, False, None)
    assert named.kind == "named" and named.schema == TIME["function"]["parameters"]
    required = tool_mode(tools, "required", False, False, None)
    assert required.schema["type"] == "array" and required.schema["maxItems"] == 1
    names = [item["properties"]["name"]["enum"] for item in required.schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert tool_mode(tools, None, True, True, "hermes").kind == "auto"
    for args, words in [((tools, None, True, False, None), ["--enable-auto-tool-choice"]),
                        ((tools, {"type": "function", "function": {"name": "nope"}}, True, False, None),
                         ["'nope'", "get_weather", "get_time"]),
                        ((None, "required", True, False, None), ["needs tools"]),
                        ((tools, "sometimes", True, False, None), ["'sometimes'"]),
                        (([{"type": "function", "function": {}}], "required", True, False, None), ["tools[0]"])]:
        with pytest.raises(ValueError) as info:
            tool_mode(*args)
        assert all(w in str(info.value) for w in words), (args, str(info.value))
    with pytest.raises(ValueError, match="tool_call_parser"):
        ToolOptions(True, None)
    with pytest.raises(ValueError, match="'mistral'"):
        ToolOptions(True, "mistral")


def test_messages_of_whole_outputs():
    named = tool_mode([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True, False, None)
    message, finish = named.message('{"city": "Lima"}', "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert _calls(message["tool_calls"]) == [("get_weather", {"city": "Lima"})]
    required = tool_mode([WEATHER, TIME], "required", True, False, None)
    message, finish = required.message('[{"name": "get_time", "parameters": {"zone": "UTC"}}]', "stop")
    assert _calls(message["tool_calls"]) == [("get_time", {"zone": "UTC"})] and finish == "tool_calls"
    assert required.message('[{"name": "get_ti', "length") == ({"role": "assistant", "content": '[{"name": "get_ti'},
                                                              "length")
    auto = tool_mode([WEATHER], "auto", True, True, "hermes")
    assert auto.message("Hello", "stop") == ({"role": "assistant", "content": "Hello"}, "stop")


def _stream(mode, pieces: list[str]) -> tuple[str, list[dict], str | None]:
    """Feed the pieces (the last one finishing); the content sent, the tool call deltas, the finish."""
    stream, content, tool_deltas, finish = ToolCallStream(mode), "", [], None
    for i, piece in enumerate(pieces):
        deltas, finish = stream.feed(piece, "stop" if i == len(pieces) - 1 else None)
        for delta in deltas:
            content += delta.get("content", "")
            tool_deltas += delta.get("tool_calls", [])
    return content, tool_deltas, finish


def test_streamed_hermes_sends_text_then_the_calls():
    auto = tool_mode([WEATHER], "auto", True, True, "hermes")
    pieces = ["Sure", ". <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Kyiv"}}', "</tool_call>"]
    content, deltas, finish = _stream(auto, pieces)
    assert content == "Sure. " and finish == "tool_calls"
    assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == [
        (0, "get_weather", {"city": "Kyiv"})]
    assert _stream(auto, ["a <tool", "box> b"]) == ("a <toolbox> b", [], "stop")


def test_streamed_named_call_sends_its_arguments_as_they_come():
    named = tool_mode([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True, False, None)
    content, deltas, finish = _stream(named, ['{"city"', ': "Bern"}'])
    assert content == "" and finish == "tool_calls"
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and deltas[0]["id"].startswith("call_")
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Bern"}'


def test_streamed_llama3_json_and_required():
    llama = tool_mode([WEATHER], "auto", True, True, "llama3_json")
    content, deltas, _ = _stream(llama, [" ", '{"name": "get_weather", "parameters": {"city": "Nice"}}'])
    assert content == "" and deltas[0]["function"]["name"] == "get_weather"
    assert _stream(llama, [" It", " is sunny."]) == (" It is sunny.", [], "stop")
    required = tool_mode([WEATHER], "required", True, False, None)
    content, deltas, finish = _stream(required, ['[{"name": "get_weather", ', '"parameters": {"city": "Ulm"}}]'])
    assert content == "" and finish == "tool_calls" and json.loads(deltas[0]["function"]["arguments"]) == {"city": "Ulm"}
