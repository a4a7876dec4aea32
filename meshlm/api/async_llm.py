"""``AsyncLLM``: the asyncio Python API (vLLM's names), and the engine under the OpenAI server.

    from meshlm import AsyncLLM, SamplingParams
    async with AsyncLLM(model="Qwen/Qwen3-0.6B", tensor_parallel_size=2) as llm:
        async for out in llm.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
            print(out.outputs[0].text)        # everything so far; output_kind="delta": only what is new

It starts the ranks as ``LLM`` does (one rank here, the ranks of the mpiexec world it runs in, or a
new world under mpiexec from a plain process), then runs the coordinator's step loop in a
background thread. Only that thread touches the coordinator. Callers hand it typed commands
(``SubmitCommand``, ``AbortCommand``) through a queue that it drains between steps, so the event
loop never waits for a step to finish. The loop thread answers only by scheduling a callback on the
caller's event loop, which cannot fail because of anything the caller did: a caller that left
(cancelled, timed out, disconnected) leaves behind a stream nobody reads, and its abort command
follows in the queue.

A caller that stops iterating ``generate`` aborts its request, which frees its KV blocks. The
deltas a slow reader has not taken yet are merged into one, so nothing piles up behind it.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from meshlm.config import EngineArgs
from meshlm.engine.interface import EngineCore
from meshlm.engine.outputs import CompletionOutput, OutputsOfKind, RequestOutput
from meshlm.sampling_params import SamplingParams

log = logging.getLogger("meshlm")


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can be served any more."""


@dataclass(eq=False)
class _Stream:
    """One request's outputs, written and read on the caller's event loop only."""

    loop: asyncio.AbstractEventLoop
    num_samples: int = 1  # the request's n
    pending: RequestOutput | None = None  # the deltas the reader has not taken, merged
    error: BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put_output(self, delta: RequestOutput) -> None:
        if self.pending is None:
            self.pending = delta
        else:
            self.pending.add(delta)  # a slow reader gets one delta covering every step it missed
        self.ready.set()

    def put_error(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()


@dataclass(slots=True, frozen=True)
class SubmitCommand:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    stream: _Stream
    prompt_text: str | None = None  # the text of a prompt tokenized by the caller


@dataclass(slots=True, frozen=True)
class AbortCommand:
    request_id: str
    stream: _Stream | None = None  # only the request this stream owns; None: whoever owns the id


class AsyncLLM:
    """Generate with asyncio over a model split into ``tensor_parallel_size x pipeline_parallel_size``
    ranks; keyword arguments are those of EngineArgs (and ``LLM``)."""

    def __init__(self, model: str | None = None, *, on_failure: Callable[[BaseException], None] | None = None,
                 **kwargs):
        """``on_failure(exc)`` is called from the loop thread if a step fails (the loop then stops)."""
        from meshlm.api.start import start_runtime
        self._start(start_runtime(EngineArgs(model=model, **kwargs)), on_failure)

    @classmethod
    def from_engine_args(cls, args: EngineArgs,
                         on_failure: Callable[[BaseException], None] | None = None) -> "AsyncLLM":
        from meshlm.api.start import start_runtime
        return cls.from_engine_core(start_runtime(args), on_failure)

    @classmethod
    def from_engine_core(cls, core: EngineCore,
                         on_failure: Callable[[BaseException], None] | None = None) -> "AsyncLLM":
        """Over an engine core already started (``meshlm.api.start.start_runtime``)."""
        llm = cls.__new__(cls)
        llm._start(core, on_failure)
        return llm

    def _start(self, coordinator: EngineCore, on_failure) -> None:
        self.coordinator = coordinator
        self._on_failure = on_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._running = True
        self._is_shut_down = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="meshlm-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.coordinator.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.coordinator.max_model_len

    @property
    def engine_core(self) -> EngineCore:
        return self.coordinator

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_text: str | None = None,
                       output_kind: str = "cumulative") -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that adds to it; the last one is finished.

        ``output_kind="cumulative"``: each output holds everything so far. ``"delta"``: only what
        is new since the previous one. A bad request raises ValueError (nothing is queued); a
        failed engine raises EngineDeadError.
        """
        outputs = OutputsOfKind(output_kind)
        params = sampling_params or SamplingParams()
        if params.bad_words:  # tokenizing is CPU work: off the event loop
            params = await asyncio.get_running_loop().run_in_executor(
                None, params.with_bad_words_tokenized, self.tokenizer)
        async for delta in self._deltas(prompt, params, request_id or f"req-{uuid.uuid4().hex}", prompt_text):
            yield outputs.next(delta)

    async def _deltas(self, prompt, params: SamplingParams, request_id: str, prompt_text: str | None):
        stream = _Stream(asyncio.get_running_loop(), params.n)
        self._send(SubmitCommand(prompt, params, request_id, stream, prompt_text))
        self._raise_if_dead()  # the loop may have died before it could see the command
        finished = False
        try:
            while not finished:
                await stream.ready.wait()
                stream.ready.clear()
                if stream.error is not None:
                    raise stream.error
                output, stream.pending = stream.pending, None
                if output is not None:
                    finished = output.finished
                    yield output
        finally:
            if not finished:  # cancelled, closed early or failed: free whatever it holds
                self._send(AbortCommand(request_id, stream))

    async def abort(self, request_id: str) -> None:
        """Abort a request (takes effect before the next step, freeing its KV blocks); never blocks.
        Its ``generate`` then ends with a finished output (finish_reason ``abort``) or nothing more."""
        self._send(AbortCommand(request_id))

    def stats(self) -> dict:
        """Gauges for metrics; read without stopping the loop, so they may be one step old."""
        coordinator = self.coordinator
        stats = {"num_running": coordinator.num_running, "num_waiting": coordinator.num_waiting,
                 "kv_cache_usage": coordinator.kv_cache_usage}
        spec_decode = coordinator.spec_decode_stats
        if spec_decode is not None:  # speculative decoding is on: its SpecDecodeStats
            stats["spec_decode"] = spec_decode
        return stats

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop failed: {self._error}")

    def _send(self, command: SubmitCommand | AbortCommand) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # --- the loop thread -----------------------------------------------------------------------
    def _deliver(self, stream: _Stream, callback, item) -> bool:
        """Hand ``item`` to the stream's event loop; False if that loop is gone (closed)."""
        try:
            stream.loop.call_soon_threadsafe(callback, item)
            return True
        except RuntimeError:
            return False

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, SubmitCommand):
                self._submit(command)
            else:
                self._abort(command)

    def _submit(self, command: SubmitCommand) -> None:
        stream = command.stream
        try:
            self.coordinator.submit(command.prompt, command.params, command.request_id, command.prompt_text)
        except Exception as exc:  # bad input: the caller gets it, nothing was queued
            self._deliver(stream, stream.put_error, exc)
            return
        self._streams[command.request_id] = stream

    def _abort(self, command: AbortCommand) -> None:
        owner = self._streams.get(command.request_id)
        if command.stream is not None and owner is not command.stream:
            return  # finished already, never accepted, or the id belongs to another caller
        self._streams.pop(command.request_id, None)
        try:
            aborted = self.coordinator.abort(command.request_id)
        except Exception:  # a bug, not the client's doing: keep serving the others
            log.exception("aborting request %s failed", command.request_id)
            return
        if aborted and command.stream is None and owner is not None:  # abort(): its reader hears the end
            ended = [CompletionOutput(i, "", [], "abort") for i in range(owner.num_samples)]
            self._deliver(owner, owner.put_output, RequestOutput(command.request_id, None, [], ended, True))

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                self._streams.pop(output.request_id, None)
            if not self._deliver(stream, stream.put_output, output) and not output.finished:
                self._abort(AbortCommand(output.request_id, stream))  # its event loop is closed

    def _loop(self) -> None:
        try:
            while self._running:
                self._drain_commands()
                coordinator = self.coordinator
                if not (coordinator.has_unfinished() or coordinator.has_pending_notices()):
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                self._publish(coordinator.step())
        except BaseException as exc:  # a failed step: every waiting client hears of it (it is logged)
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        log.exception("engine loop failed")
        error = EngineDeadError(f"the engine loop failed: {exc}")
        for stream in list(self._streams.values()):
            self._deliver(stream, stream.put_error, error)
        self._streams.clear()
        while True:  # submits that raced with the failure are answered too
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, SubmitCommand):
                self._deliver(command.stream, command.stream.put_error, error)
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:
                log.exception("the engine failure callback failed")

    def shutdown(self) -> None:
        """Stop after the step in progress, then shut the coordinator (and the other ranks) down.

        The join has no time limit of its own: a step always ends, or the step watchdog aborts the
        job; shutting down while the loop thread is still inside a step would interleave the
        shutdown with the step's collectives. After a failed step the coordinator is left as it is
        (its state is unknown): the caller raises, and a launcher aborts the other ranks."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        self._running = False
        self._wakeup.set()
        self._thread.join()
        if self._error is None:
            self._drain_commands()
            self.coordinator.shutdown()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        self.shutdown()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
