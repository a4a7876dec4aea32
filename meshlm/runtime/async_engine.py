"""The coordinator's step loop in a background thread, for asyncio callers (the server).

``generate`` submits a request and yields its outputs as the loop produces them. A caller that
stops iterating (a client that disconnected) aborts its request, which frees its KV blocks.
Coordinator calls are serialised by one lock; the loop sleeps while nothing is queued.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from meshlm.runtime.outputs import RequestOutput
from meshlm.runtime.sampling_params import SamplingParams

log = logging.getLogger("meshlm")


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    first_output: float | None = None


class AsyncEngine:
    def __init__(self, coordinator):
        self.coordinator = coordinator
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._running = True
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="meshlm-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.coordinator.tokenizer

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after each step that adds to it.

        A bad request raises ValueError before anything is queued.
        """
        if self._error is not None:
            raise RuntimeError(f"the engine loop failed: {self._error}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        with self._lock:
            request_id = self.coordinator.submit(prompt, params, request_id)
            self._streams[request_id] = stream
        self._wakeup.set()
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

    def abort(self, request_id: str) -> bool:
        with self._lock:
            self._streams.pop(request_id, None)
            aborted = self.coordinator.abort(request_id)
        self._wakeup.set()  # the next step tells the other ranks
        return aborted

    def stats(self) -> dict:
        coordinator = self.coordinator
        with self._lock:
            return {"num_running": coordinator.num_running, "num_waiting": coordinator.num_waiting,
                    "kv_cache_usage": coordinator.kv.usage}

    def _loop(self) -> None:
        try:
            while self._running:
                with self._lock:
                    busy = self.coordinator.has_unfinished() or self.coordinator.has_pending_notices()
                    outputs = self.coordinator.step() if busy else []
                if not busy:
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    if output.finished:
                        self._streams.pop(output.request_id, None)
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)
        except BaseException as exc:  # a failed step: every waiting client hears of it
            self._error = exc
            log.exception("engine loop failed")
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
            raise

    def shutdown(self) -> None:
        self._running = False
        self._wakeup.set()
        self._thread.join(timeout=30)
        with self._lock:
            self.coordinator.shutdown()
