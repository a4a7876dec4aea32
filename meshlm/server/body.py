"""Request bodies: read within the size limit, parsed and validated on a worker thread.

Every way a body can be wrong answers 4xx with OpenAI's envelope: 413 past the size limit, 400 for
JSON that does not parse (or nests too deep), strings that are not valid Unicode (lone surrogates,
which JSON's ``\\ud800`` escapes can carry), non-finite numbers and fields of the wrong type.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import Executor
from http import HTTPStatus
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from meshlm.server.errors import APIError, from_pydantic_errors
from meshlm.server.streams import ClientDisconnected

M = TypeVar("M", bound=BaseModel)

_MAX_DEPTH = 64  # no request of the API nests deeper than a few levels


def too_large(size: int, limit: int) -> APIError:
    return APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body has {size} bytes or more; "
                    f"this server accepts at most {limit} (--max-request-body-bytes)",
                    code="request_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing one over ``limit`` bytes as soon as it is known to be."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected() from None
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M], limit: int, pool: Executor) -> M:
    """Read, parse and validate the body as ``model``, off the event loop."""
    raw = await read_body(request, limit)
    return await asyncio.get_running_loop().run_in_executor(pool, _parse, raw, model)


def _parse(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise APIError(HTTPStatus.BAD_REQUEST, f"the body nests deeper than {_MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise APIError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(HTTPStatus.BAD_REQUEST, f"the body must be a JSON object, not {_json_type(data)}")
    check_json_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic_errors(exc.errors()) from None


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def check_json_values(data: dict) -> None:
    """Refuse strings that are not valid Unicode and nesting past ``_MAX_DEPTH``, naming where."""
    pending: list[tuple[object, str, int]] = [(data, "", 0)]
    while pending:
        value, path, depth = pending.pop()
        if depth > _MAX_DEPTH:
            raise APIError(HTTPStatus.BAD_REQUEST, f"{path or 'the body'}: nests deeper than {_MAX_DEPTH} levels",
                           param=_top(path))
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path or "the body")
                pending.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(HTTPStatus.BAD_REQUEST, f"{path}: not valid Unicode ({exc.reason} at character "
                       f"{exc.start}, {text[exc.start]!a})", param=_top(path)) from None


def _top(path: str) -> str | None:
    return path.split(".")[0].split("[")[0] or None
