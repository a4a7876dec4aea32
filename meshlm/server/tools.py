"""Tool calling in the chat API: what ``tools`` and ``tool_choice`` ask for, and the tool calls
found in the model's output (vLLM's flags and parser names).

- ``none`` (or no tools): plain text.
- a named function ``{"type": "function", "function": {"name": ...}}``: the output is constrained
  to that function's ``parameters`` schema and is the call's arguments.
- ``required``: the output is constrained to a JSON array of ``{"name", "parameters"}`` calls, one
  object schema per tool; at least one call (exactly one with ``parallel_tool_calls: false``).
- ``auto`` (the default with tools; needs ``--enable-auto-tool-choice`` and a
  ``--tool-call-parser``): the model decides, and the parser finds the calls in its text: ``hermes``
  (Hermes, Qwen: ``<tool_call>{"name", "arguments"}</tool_call>``) or ``llama3_json`` (Llama 3:
  ``{"name", "parameters"}`` objects, separated by ``;``).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from meshlm.structured_outputs import StructuredOutputsParams

__all__ = ["ToolOptions", "ToolMode", "tool_mode", "parse_tool_calls", "TOOL_CALL_PARSERS"]

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_LLAMA_PYTHON_TAG = "<|python_tag|>"
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(slots=True, frozen=True)
class ToolOptions:
    """The server's tool flags: ``--enable-auto-tool-choice`` and ``--tool-call-parser``."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser={self.tool_call_parser!r} must be one of "
                             f"{', '.join(TOOL_CALL_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser (--tool-call-parser "
                             f"{'|'.join(TOOL_CALL_PARSERS)}) to find the calls in the output")

    @staticmethod
    def add_cli_args(parser) -> None:
        parser.add_argument("--enable-auto-tool-choice", action="store_true",
                            help="let the model decide whether to call tools (tool_choice 'auto', the "
                                 "default with tools); needs --tool-call-parser")
        parser.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                            help="how tool calls are written in the output: hermes (Hermes, Qwen: "
                                 "<tool_call>JSON</tool_call>) or llama3_json (Llama 3 JSON)")

    @classmethod
    def from_cli(cls, ns) -> "ToolOptions":
        return cls(ns.enable_auto_tool_choice, ns.tool_call_parser)


@dataclass(slots=True, frozen=True)
class ToolMode:
    """How one chat request uses its tools: ``kind`` is none, auto, required or named."""

    kind: str
    tools: tuple[dict, ...] = ()  # the request's function definitions: {"name", "parameters", ...}
    name: str | None = None  # the named function
    parser: str | None = None  # auto: the tool-call parser
    parallel: bool = True  # required: more than one call allowed
    schema: dict | None = field(default=None, compare=False)  # required / named: what the output must match

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The constraint of a required or named call; None otherwise."""
        if self.schema is None:
            return None
        try:
            return StructuredOutputsParams(json=self.schema)
        except ValueError as exc:
            raise ValueError(f"tools: a function's parameters are not a schema llguidance compiles: {exc}") from None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a whole output, and its finish_reason (``tool_calls`` when the
        message calls tools and generation stopped on its own)."""
        content, calls = self.parse(text)
        message = {"role": "assistant", "content": content}
        if not calls:
            return message, finish_reason
        message["tool_calls"] = calls
        return message, "tool_calls" if finish_reason == "stop" else finish_reason

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of an output."""
        if self.kind == "named":
            return None, [tool_call(self.name, text)]
        if self.kind == "required":
            try:
                calls = json.loads(text)
                return None, [tool_call(c["name"], c.get("parameters", {})) for c in calls]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens
                return text, []
        if self.kind == "auto":
            return parse_tool_calls(self.parser, text)
        return text, []


def tool_mode(tools: list[dict] | None, tool_choice: str | dict | None, parallel: bool,
              auto_enabled: bool, parser: str | None) -> ToolMode:
    """The request's ToolMode; ValueError naming ``tools`` or ``tool_choice`` for what is wrong."""
    functions = tuple(_function(i, tool) for i, tool in enumerate(tools or []))
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if isinstance(tool_choice, dict):
        name = _named_choice(tool_choice)
        known = [f["name"] for f in functions]
        if name not in known:
            raise ValueError(f"tool_choice: the function {name!r} is not among the tools {known}")
        parameters = next(f for f in functions if f["name"] == name).get("parameters") or _NO_PARAMETERS
        return ToolMode("named", functions, name=name, schema=parameters)
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f"tool_choice={tool_choice!r} must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}")
    if tool_choice != "none" and not functions:
        raise ValueError(f"tool_choice: {tool_choice!r} needs tools, and the request has none")
    if tool_choice == "auto" and not (auto_enabled and parser):
        raise ValueError("tool_choice: 'auto' needs the server started with --enable-auto-tool-choice and "
                         f"--tool-call-parser (one of {', '.join(TOOL_CALL_PARSERS)}); use 'required', "
                         "a named function or 'none'")
    if tool_choice == "required":
        return ToolMode("required", functions, parallel=parallel, schema=_calls_schema(functions, parallel))
    return ToolMode(tool_choice, functions, parser=parser if tool_choice == "auto" else None)


def _function(index: int, tool: object) -> dict:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
            not isinstance(tool.get("function"), dict):
        raise ValueError(f"tools: tools[{index}] must be {{'type': 'function', 'function': {{'name', "
                         f"'parameters', ...}}}}, not {tool!r}")
    function = tool["function"]
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"tools: tools[{index}].function needs a name, got {function.get('name')!r}")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError(f"tools: tools[{index}].function.parameters must be a JSON schema object")
    return function


def _named_choice(tool_choice: dict) -> str:
    function = tool_choice.get("function")
    if tool_choice.get("type") != "function" or not isinstance(function, dict) or \
            not isinstance(function.get("name"), str):
        raise ValueError(f"tool_choice={tool_choice!r} must be {{'type': 'function', 'function': "
                         "{'name': ...}}")
    return function["name"]


def _calls_schema(functions: tuple[dict, ...], parallel: bool) -> dict:
    """A JSON array of calls, each ``{"name": one tool's name, "parameters": its arguments}``."""
    one_of_each = [{"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                                     "parameters": f.get("parameters") or _NO_PARAMETERS},
                    "required": ["name", "parameters"], "additionalProperties": False} for f in functions]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_each}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_call(name: str, arguments: str | dict) -> dict:
    """One call of the response: arguments always as JSON text, as OpenAI sends them."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict]]:
    """(content, tool calls) found by ``parser`` in ``text``; no calls: the whole text is content."""
    if parser == "hermes":
        return _parse_hermes(text)
    if parser == "llama3_json":
        return _parse_llama3_json(text)
    raise ValueError(f"tool_call_parser={parser!r} must be one of {', '.join(TOOL_CALL_PARSERS)}")


def _parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    start = text.find(_HERMES_START)
    if start < 0:
        return text, []
    calls = []
    for body in _HERMES_CALL.findall(text[start:]):
        try:
            call = json.loads(body)
            calls.append(tool_call(call["name"], call.get("arguments", {})))
        except (ValueError, TypeError, KeyError):
            return text, []  # not a call after all: keep the text as it is
    content = text[:start].strip()
    return content or None, calls


def _parse_llama3_json(text: str) -> tuple[str | None, list[dict]]:
    body = text.strip().removeprefix(_LLAMA_PYTHON_TAG).lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    try:
        while pos < len(body):
            call, pos = decoder.raw_decode(body, pos)
            arguments = call.get("parameters", call.get("arguments"))
            if not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
                return text, []
            calls.append(tool_call(call["name"], arguments))
            pos = len(body) - len(body[pos:].lstrip().removeprefix(";").lstrip())
    except (ValueError, AttributeError):
        return text, []
    return None, calls
