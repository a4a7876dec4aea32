"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``, for every failure.

Invalid values (pydantic's checks, ``SamplingParams``, the coordinator's prompt checks, malformed
JSON) answer 400, not FastAPI's 422, as OpenAI and vLLM do.
"""
from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("meshlm")

# "temperature=-1.0 must be ..." or "stop: ..." name the field they are about.
_PARAM = re.compile(r"^([A-Za-z_]+)(?:=|: )")
_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.err_type = err_type or ("invalid_request_error" if status < 500 else "server_error")

    @classmethod
    def bad_request(cls, exc: ValueError, param: str | None = None) -> "APIError":
        """A ValueError from SamplingParams or the coordinator: 400, naming the field if it can."""
        message = str(exc)
        match = _PARAM.match(message)
        return cls(HTTPStatus.BAD_REQUEST, message, match.group(1) if match else param)


def error_body(message: str, err_type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.err_type, err.param, err.code),
                        status_code=err.status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(from_pydantic_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(APIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}"))


def from_pydantic_errors(errors) -> APIError:
    """The first of pydantic's errors, as ``field: message``; malformed JSON says so."""
    if not errors:
        return APIError(HTTPStatus.BAD_REQUEST, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {first.get('msg')}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # A union reports one error per member, its loc naming the member's type: keep the field path.
    field = ".".join(p for p in loc if "[" not in p and p not in _TYPE_NAMES) or None
    param = loc[0] if loc else None
    where = f"{field}: " if field else ""
    given = first.get("input")
    shown = f" (got {_short_repr(given)})" if isinstance(given, (int, float, str)) else ""
    return APIError(HTTPStatus.BAD_REQUEST, f"{where}{first.get('msg')}{shown}", param)


def _short_repr(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "a very large integer"
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"
