"""Structured outputs and tool calls through ``meshlm serve`` (default model, CPU), driven by the
official ``openai`` client: response_format, vLLM's guided_* extras, named and required
tool_choice (whole and streamed), tool results fed back, and 400s that name the bad field while
the server keeps serving. Expected values are the constraints themselves and, for the prompt of
a conversation with tool messages, the tokens transformers' chat template gives."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server_process import ServerProcess, serve_argv

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(900)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir():
    from meshlm.weights.default_model import ensure_default_model
    try:
        return ensure_default_model()
    except RuntimeError as exc:
        pytest.skip(f"the default model is not available: {exc}")


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    argv = serve_argv(model_dir, "--max-model-len", "1024", "--num-kv-blocks", "128", "--device", "cpu",
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    server = ServerProcess(argv, tmp_path_factory.mktemp("server") / "server.log")
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    server.kill()


def check_call(name: str, arguments: str) -> None:
    """The call names a tool and its arguments satisfy that tool's schema, written out."""
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and isinstance(args["city"], str), args
        assert len(args["city"]) <= 16 and args["unit"] in ("celsius", "fahrenheit"), args
    else:
        assert name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET"), args


def _named(client, stream: bool):
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME], max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=stream)


def _required(client, stream: bool):
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER, TIME],
                                          tool_choice="required", parallel_tool_calls=False, max_tokens=48,
                                          temperature=1.0, seed=5, stream=stream)


def _streamed_calls(chunks) -> tuple[list[tuple[str, str]], str | None, str]:
    """(name, arguments) of every streamed call, assembled by index; the finish_reason; the content."""
    calls: dict[int, list[str]] = {}
    finish, content = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                name_args = calls.setdefault(call.index, ["", ""])
                if call.function.name:
                    assert call.id and call.id.startswith("call_") and not name_args[0]
                    name_args[0] = call.function.name
                name_args[1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish, content


def test_named_and_required_tool_calls(client):
    with ThreadPoolExecutor(4) as pool:  # run together: one batch on the server
        named, named_stream, required, required_stream = [f.result() for f in [
            pool.submit(_named, client, False), pool.submit(lambda: list(_named(client, True))),
            pool.submit(_required, client, False), pool.submit(lambda: list(_required(client, True)))]]
    for out in (named, required):
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    for chunks, name in ((named_stream, "get_weather"), (required_stream, None)):
        calls, finish, content = _streamed_calls(chunks)
        assert finish == "tool_calls" and content == "" and len(calls) == 1, (calls, finish, content)
        assert name is None or calls[0][0] == name
        check_call(*calls[0])
    # Streamed and whole answers of the same greedy request carry the same arguments.
    assert _streamed_calls(named_stream)[0][0][1] == named.choices[0].message.tool_calls[0].function.arguments


def test_tool_results_are_fed_back_through_the_template(client, model_dir):
    from transformers import AutoTokenizer
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    out = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, tools=[WEATHER],
                                         tool_choice="none", max_tokens=4, temperature=0)
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason in ("stop", "length")
    template_messages = [dict(m) for m in messages]
    template_messages[1] = {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}]}
    ids = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(
        template_messages, tools=[WEATHER], add_generation_prompt=True, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert out.usage.prompt_tokens == len(ids)


def test_response_format_and_guided_extras(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 16}}}
    chat = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name a city, as JSON."}],
        max_tokens=32, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    value = json.loads(chat.choices[0].message.content)
    assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 16
    regex = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The year was", max_tokens=12,
                                      temperature=1.0, seed=3, extra_body={"guided_regex": r" 1[0-9]{3}\."})
    assert re.fullmatch(r" 1[0-9]{3}\.", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    choice = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Red or blue?"}], max_tokens=8,
        temperature=0, extra_body={"guided_choice": ["red", "blue"]})
    assert choice.choices[0].message.content in ("red", "blue")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integerx"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "[a-z"}}, "guided_regex"),
    ({"extra_body": {"guided_json": {"type": "object"}, "guided_regex": "a"}}, "guided_json"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_specs_answer_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=2, **extra)
    assert info.value.body["param"] == param and param in info.value.body["message"], info.value.body
    ok = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=1)
    assert ok.choices[0].finish_reason in ("stop", "length")
