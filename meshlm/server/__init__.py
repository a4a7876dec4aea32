"""OpenAI-compatible HTTP server on rank 0 (``meshlm serve``): FastAPI routes over an AsyncLLM."""
from __future__ import annotations

__all__ = ["build_app", "run_server"]


def __getattr__(name):  # FastAPI and uvicorn load only when the server is used
    if name == "build_app":
        from meshlm.server.app import build_app
        return build_app
    if name == "run_server":
        from meshlm.server.launch import run_server
        return run_server
    raise AttributeError(name)
