"""Structured outputs: the per-request constraint on what the output may be (vLLM's names).

``StructuredOutputsParams`` holds exactly one of ``json`` (a JSON schema), ``regex``, ``choice``
(a list of strings), ``grammar`` (Lark, or GBNF as llama.cpp writes it) or ``json_object`` (any JSON
object). It is checked on construction: a schema, regex or grammar that llguidance cannot compile
raises ``ValueError`` naming the field and llguidance's reason, so a server answers 400 before any
rank sees the request. ``grammar_text`` is the llguidance grammar the sampling rank compiles
against the tokenizer (executor/grammar.py); both are cached per distinct spec.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

__all__ = ["StructuredOutputsParams"]

# JSON is written as json.dumps writes it (", " and ": ", no other whitespace): models know that
# shape, and output with no free whitespace cannot wander off into blank lines.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type": "object"}'
_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True, frozen=True)
class StructuredOutputsParams:
    """What the output must match; exactly one field is set.

    ``json`` is a JSON schema (a dict, or its JSON text); ``choice`` a list of strings, one of which
    is the whole output; ``grammar`` a Lark grammar (or GBNF); ``json_object=True`` any JSON object.
    """

    json: str | Mapping | None = None  # normalised to the schema's JSON text (property order kept)
    regex: str | None = None
    choice: Sequence[str] | None = None  # normalised to a tuple of strings
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if self.json is not None and not isinstance(self.json, str):
            if not isinstance(self.json, Mapping):
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its JSON "
                                 f"text), not {type(self.json).__name__}")
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"structured_outputs.choice={self.choice!r} must be a list of strings")
            if not self.choice:
                raise ValueError("structured_outputs.choice=[] must list at least one string")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object is False:
            object.__setattr__(self, "json_object", None)
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of {', '.join(_KINDS)}; "
                             f"got {len(given)}: {given}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, not {type(value).__name__}")
        _compile(*self.key)  # raises ValueError for what llguidance cannot compile

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): equal for equal constraints; the cache key of the compiled grammar."""
        kind = self.kind
        if kind == "choice":
            return kind, json.dumps(list(self.choice))
        if kind == "json_object":
            return "json", _ANY_OBJECT
        return kind, getattr(self, kind)

    def grammar_text(self) -> str:
        """The llguidance grammar of this constraint (checked; cached per distinct spec)."""
        return _compile(*self.key)

    def to_dict(self) -> dict:
        """The set field as JSON-ready values; ``from_dict`` reverses it."""
        value = getattr(self, self.kind)
        return {self.kind: list(value) if isinstance(value, tuple) else value}

    @classmethod
    def from_dict(cls, values: Mapping) -> StructuredOutputsParams:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"structured_outputs: unknown fields {unknown}; known: {sorted(names)}")
        return cls(**values)


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    """The llguidance grammar of (kind, text), validated without a tokenizer; ValueError if invalid."""
    import llguidance
    try:
        if kind == "json":
            schema = json.loads(text)
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema is an object, not {type(schema).__name__}")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        else:
            grammar = llguidance.grammar_from(kind, text)  # regex, choice (JSON list), Lark or GBNF
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ValueError(f"structured_outputs.{kind}: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, None)
    if error:
        raise ValueError(f"structured_outputs.{kind}: {error.strip()}")
    return grammar
