"""The coordinator's step loop in a background thread, for asyncio callers (the server).

Only the loop thread touches the coordinator. Callers hand it commands (submit, abort) through a
queue that it drains between steps, so the event loop never waits for a step to finish.
``generate`` submits a request and yields its outputs as the loop produces them; a caller that
stops iterating (a client that disconnected) aborts its request, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from meshlm.engine.outputs import RequestOutput
from meshlm.sampling_params import SamplingParams

log = logging.getLogger("meshlm")


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    first_output: float | None = None


class AsyncLLM:
    def __init__(self, coordinator):
        self.coordinator = coordinator
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._running = True
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="meshlm-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.coordinator.tokenizer

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after each step that adds to it.

        A bad request raises ValueError before anything is queued.
        """
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._send(("submit", (prompt, params, request_id, stream), accepted))
        try:
            request_id = await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:  # the caller left while the request was being queued
            accepted.add_done_callback(lambda f: f.exception() is None and self.abort(f.result()))
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine loop failed: {item}")
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (takes effect before the next step); never blocks."""
        self._send(("abort", request_id, None))

    def stats(self) -> dict:
        """Gauges for metrics; read without stopping the loop, so they may be one step old."""
        coordinator = self.coordinator
        return {"num_running": coordinator.num_running, "num_waiting": coordinator.num_waiting,
                "kv_cache_usage": coordinator.kv.usage}

    def _send(self, command) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                prompt, params, request_id, stream = payload
                try:
                    request_id = self.coordinator.submit(prompt, params, request_id)
                except Exception as exc:  # bad input: the caller gets it, nothing was queued
                    reply.set_exception(exc)
                    continue
                self._streams[request_id] = stream
                reply.set_result(request_id)
            elif kind == "abort":
                self._streams.pop(payload, None)
                self.coordinator.abort(payload)

    def _loop(self) -> None:
        try:
            while self._running:
                self._drain_commands()
                coordinator = self.coordinator
                if not (coordinator.has_unfinished() or coordinator.has_pending_notices()):
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                for output in coordinator.step():
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    if output.finished:
                        self._streams.pop(output.request_id, None)
                    _deliver(stream, output)
        except BaseException as exc:  # a failed step: every waiting client hears of it
            self._error = exc
            log.exception("engine loop failed")
            for stream in list(self._streams.values()):
                _deliver(stream, exc)
            raise

    def shutdown(self) -> None:
        """Stop after the step in progress, then shut the coordinator (and the other ranks) down.

        The join has no time limit of its own: a step always ends, or the step watchdog aborts the
        job. Shutting down while the loop thread is still inside a step would interleave the
        shutdown with the step's collectives.
        """
        self._running = False
        self._wakeup.set()
        self._thread.join()
        self._drain_commands()
        self.coordinator.shutdown()


def _deliver(stream: _Stream, item) -> None:
    """Hand ``item`` to the stream's event loop; a loop already closed (the server has stopped and
    its client is gone) is skipped, not an error of the engine loop."""
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:
        if not stream.loop.is_closed():
            raise
