"""Connections: the open-files limit, a cap on open connections, and a deadline for each request.

uvicorn keeps a connection open for as long as its client sends nothing, or a header line now and
then: idle clients could hold every file descriptor. ``GuardedH11Protocol`` is uvicorn's h11
protocol plus two rules:
- past ``limit_concurrency`` open connections, a new one is answered 503 (OpenAI's envelope) at
  once and closed, so the server's own descriptors never run out;
- a request (head and body) must arrive within ``request_read_timeout_s`` of the connection opening
  or of the previous response; otherwise the connection is closed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("meshlm")

# Descriptors kept for what is not a client connection: model files, MPI, the listening socket, logs.
_RESERVED_FDS = 256
_LINGER_S = 1.0  # a refused connection reads (and drops) what its client sends this long, then closes


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit (as vLLM does); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(requested: int, open_files_limit: int) -> int:
    """``requested``, lowered so that connections leave ``_RESERVED_FDS`` descriptors free."""
    if open_files_limit == resource.RLIM_INFINITY:
        return requested
    allowed = max(1, open_files_limit - _RESERVED_FDS)
    if requested > allowed:
        log.warning("--limit-concurrency %d lowered to %d: the open-files limit is %d, %d kept for the server",
                    requested, allowed, open_files_limit, _RESERVED_FDS)
    return min(requested, allowed)


def _busy_response(limit: int) -> bytes:
    body = json.dumps({"error": {"message": f"the server has {limit} open connections, its limit "
                                 "(--limit-concurrency); retry later", "type": "server_error",
                                 "param": None, "code": 503}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\nretry-after: 1\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-read deadline (see the module)."""

    connection_limit: int = 4096  # set on a subclass by ``guarded_protocol``
    request_read_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._read_deadline: asyncio.TimerHandle | None = None
        self._refused = len(self.server_state.connections) >= self.connection_limit
        if self._refused:
            self.transport = transport
            transport.write(_busy_response(self.connection_limit))
            if transport.can_write_eof():
                transport.write_eof()  # then drop what the client sends, so it reads the 503, not a reset
            self._read_deadline = self.loop.call_later(_LINGER_S, transport.close)
            return
        super().connection_made(transport)
        self._arm_read_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_deadline()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._cancel_read_deadline()  # the whole request is in

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_read_deadline()  # the next request on this connection gets a fresh deadline
        super().on_response_complete()

    def _arm_read_deadline(self) -> None:
        self._cancel_read_deadline()
        self._read_deadline = self.loop.call_later(self.request_read_timeout_s, self._read_timed_out)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            log.debug("closing a connection whose request did not arrive within %.1f s",
                      self.request_read_timeout_s)
            self.transport.close()


def guarded_protocol(connection_limit: int, request_read_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give uvicorn (``Config(http=...)``) with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "connection_limit": connection_limit, "request_read_timeout_s": request_read_timeout_s})
