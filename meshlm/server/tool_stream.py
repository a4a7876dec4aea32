"""Tool calls in a streamed chat answer: one ``ToolCallStream`` per choice turns its text deltas
into message deltas (``content`` or ``tool_calls``) as OpenAI streams them.

A named function streams its arguments as they come (the first delta carries the call's id and
name). ``required`` holds the text and sends every call when the output ends (the array is only
known whole). ``auto`` streams text as content until the parser's marker of a call shows up
(``<tool_call>`` for hermes; for llama3_json an output that starts with ``{``), then holds the
rest and sends the calls it finds at the end, or the held text as content if there are none.
"""
from __future__ import annotations

import uuid

from meshlm.server.tools import ToolMode

__all__ = ["ToolCallStream"]

_HERMES_START = "<tool_call>"
_LLAMA_STARTS = ("{", "<|python_tag|>")


class ToolCallStream:
    """Message deltas of one streamed choice under its request's ToolMode."""

    def __init__(self, mode: ToolMode):
        self.mode = mode
        self.held = ""  # text not sent yet
        self.state = "undecided"  # auto: "text" once it cannot be a call, "calling" once it is one
        self.call_id: str | None = None  # named: the call's id, once its first delta is out

    def feed(self, text: str, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The message deltas of the new ``text`` and the choice's finish_reason (``tool_calls`` in
        place of ``stop`` when the choice called tools)."""
        kind = self.mode.kind
        if kind == "none":
            return ([{"content": text}] if text else []), finish_reason
        if kind == "named":
            return self._named(text), _finish(finish_reason, True)
        self.held += text
        deltas = []
        if kind == "auto" and self.state != "calling":
            sent = self._release()
            if sent:
                deltas.append({"content": sent})
        if finish_reason is None:
            return deltas, None
        content, calls = self.mode.parse(self.held) if self.held else (None, [])
        self.held = ""
        if content:
            deltas.append({"content": content})
        if calls:
            deltas.append({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        return deltas, _finish(finish_reason, bool(calls))

    def _named(self, text: str) -> list[dict]:
        deltas = []
        if self.call_id is None:
            self.call_id = f"call_{uuid.uuid4().hex[:24]}"
            deltas.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                           "function": {"name": self.mode.name, "arguments": ""}}]})
        if text:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return deltas

    def _release(self) -> str:
        """auto: the held text that cannot start a call, taken out of ``held``."""
        if self.state == "text":
            sent, self.held = self.held, ""
            return sent
        if self.mode.parser == "llama3_json":
            start = self.held.lstrip()
            if not start or any(m.startswith(start) for m in _LLAMA_STARTS):
                return ""  # still undecided
            self.state = "calling" if start.startswith(_LLAMA_STARTS) else "text"
            return self._release() if self.state == "text" else ""
        found = self.held.find(_HERMES_START)
        if found >= 0:
            self.state = "calling"
            sent, self.held = self.held[:found], self.held[found:]
            return sent
        keep = _partial_marker(self.held, _HERMES_START)
        sent, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return sent


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _finish(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
