"""The FastAPI app: OpenAI's routes over one AsyncLLM, plus /health and /metrics.

    app = build_app(ServedModel(engine, "SmolLM2-135M-Instruct", root, max_model_len, metrics))

With an API key, every /v1 route wants ``Authorization: Bearer KEY`` (401 otherwise); /health and
/metrics stay open, as in vLLM.
"""
from __future__ import annotations

import logging
import secrets
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import Response

from meshlm.api.async_llm import EngineDeadError
from meshlm.server.body import parse_body
from meshlm.server.chat import create_chat_completion
from meshlm.server.completions import create_completion
from meshlm.server.errors import APIError, error_response, install_error_handlers
from meshlm.server.metrics import CONTENT_TYPE
from meshlm.server.protocol import ChatCompletionRequest, CompletionRequest
from meshlm.server.serving import ServedModel
from meshlm.server.streams import ClientDisconnected, ServerShuttingDown

log = logging.getLogger("meshlm")

# What a request whose client has gone answers (nobody reads it); nginx's "client closed request".
_CLIENT_CLOSED = 499


def build_app(served: ServedModel, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="meshlm", summary="OpenAI-compatible server")
    app.state.served = served
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health():
        ok = served.engine.is_healthy
        return Response(status_code=HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE)

    @app.get("/metrics")
    async def metrics():
        stats = served.engine.stats()
        return Response(served.metrics.render(stats), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != served.name:
            raise APIError(HTTPStatus.NOT_FOUND, f"the model `{model_id}` does not exist", param="model",
                           code="model_not_found")
        return _model_card(served)

    # Bodies are read here (not by FastAPI) so that size, nesting, Unicode and parse time are bounded.
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(_with_body(served, request, CompletionRequest, create_completion))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _answer(_with_body(served, request, ChatCompletionRequest, create_chat_completion))

    return app


async def _with_body(served: ServedModel, request: Request, model, create):
    body = await parse_body(request, model, served.limits.max_request_body_bytes, served.pool)
    _warn_extra(body)
    return await create(served, body, request)


async def _answer(work):
    try:
        return await work
    except ClientDisconnected:
        return Response(status_code=_CLIENT_CLOSED)
    except ServerShuttingDown:
        return error_response(APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"))
    except EngineDeadError as exc:
        return error_response(APIError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)))


def _model_card(served: ServedModel) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "meshlm",
            "root": served.root, "parent": None, "max_model_len": served.max_model_len}


def _warn_extra(body) -> None:
    if body.model_extra:
        names = sorted(body.model_extra)
        shown = ", ".join(repr(name[:40]) for name in names[:10])
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        log.warning("ignored unknown request fields: %s%s", shown, more)


class APIKeyMiddleware:
    """Plain ASGI (so streams and disconnects pass untouched): /v1 routes need the bearer key."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                message = "missing API key" if not given else "incorrect API key"
                response = error_response(APIError(HTTPStatus.UNAUTHORIZED, f"{message}: send the header "
                                                   "'Authorization: Bearer <key>'", code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
