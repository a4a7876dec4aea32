"""The request fields that ask for structured outputs, as one ``StructuredOutputsParams``.

OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``), vLLM's ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar`` and ``structured_outputs``: a request may
use one of them. A schema, regex or grammar that does not compile raises ``ValueError`` whose
message starts with the field's name, so the answer is 400 naming it.
"""
from __future__ import annotations

from meshlm.structured_outputs import StructuredOutputsParams

__all__ = ["structured_outputs_of", "response_format_fields"]

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_outputs_of(body) -> StructuredOutputsParams | None:
    """The constraint ``body`` asks for, or None (a body with the fields of ``_SamplingFields``)."""
    requested: dict[str, dict] = {}
    if body.response_format is not None:
        fields = response_format_fields(body.response_format)
        if fields is not None:
            requested["response_format"] = fields
    for name, kind in _GUIDED.items():
        value = getattr(body, name)
        if value is not None:
            requested[name] = {kind: value}
    if body.structured_outputs is not None:
        requested["structured_outputs"] = body.structured_outputs
    if len(requested) > 1:
        raise ValueError(f"{next(iter(requested))}: give one way of structured outputs, not "
                         f"{len(requested)} ({', '.join(requested)})")
    if not requested:
        return None
    ((name, fields),) = requested.items()
    try:
        return StructuredOutputsParams.from_dict(fields)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    except TypeError as exc:  # a field of the wrong kind
        raise ValueError(f"{name}: {exc}") from None


def response_format_fields(response_format: dict) -> dict | None:
    """``StructuredOutputsParams`` fields of OpenAI's response_format; None for ``text``."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format: type 'json_schema' needs json_schema.schema, the JSON "
                             f"schema (an object); got json_schema={spec!r}")
        # "strict" asks for output that always matches the schema: every schema here is enforced.
        return {"json": spec["schema"]}
    raise ValueError(f"response_format: type {kind!r} is not one of 'text', 'json_object', 'json_schema'")
