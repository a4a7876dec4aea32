"""Engine streams of one HTTP request, and what happens to them when the client goes away.

An HTTP request may hold several engine requests (a list of prompts). They are started together
(a bad prompt fails the whole HTTP request with 400 before anything is sent), merged into one
stream, and every engine stream is closed explicitly when the HTTP request ends for any reason:
closing an ``AsyncLLM.generate`` generator aborts its request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Sequence, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from meshlm.engine.outputs import RequestOutput
from meshlm.sampling_params import SamplingParams
from meshlm.server.errors import error_body

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


class ServerShuttingDown(Exception):
    pass


@dataclass(slots=True, frozen=True)
class Prompt:
    """What the engine is given: token ids (tokenized by the server) and the text they came from."""

    tokens: str | list[int]  # text only when the server has no tokenizer (the engine refuses it)
    text: str | None


@dataclass(slots=True, eq=False)
class Run:
    """One engine request that has produced its first output."""

    gen: AsyncIterator[RequestOutput]
    first: RequestOutput


async def _tracked(engine, prompt: Prompt, params: SamplingParams, request_id: str, metrics):
    """``engine.generate`` that records the request's latencies and tokens when it ends."""
    arrival, first_token, whole = time.monotonic(), None, None
    gen = engine.generate(prompt.tokens, params, request_id, prompt_text=prompt.text, output_kind="delta")
    try:
        async for delta in gen:
            if first_token is None and any(c.token_ids for c in delta.outputs):
                first_token = time.monotonic()
            if whole is None:
                whole = RequestOutput.accumulate(delta)
            else:
                whole.add(delta)
            yield delta
    finally:
        await gen.aclose()  # aborts the request if it has not finished
        if whole is not None:
            metrics.record(whole, arrival, first_token)


async def _start(engine, prompt, params, request_id, metrics) -> Run:
    gen = _tracked(engine, prompt, params, request_id, metrics)
    try:
        return Run(gen, await gen.__anext__())
    except BaseException:
        await gen.aclose()
        raise


async def start_runs(engine, prompts: Sequence[Prompt], params: SamplingParams, request_id: str,
                     metrics) -> list[Run]:
    """Submit every prompt at once and wait for each one's first output.

    A ValueError for any prompt (too long, empty, ...) is raised after the others are aborted;
    so is a cancellation (the client left while the prompts waited for their first token).
    """
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
    tasks = [asyncio.ensure_future(_start(engine, p, params, i, metrics)) for p, i in zip(prompts, ids)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t.exception() for t in done if t.exception() is not None]
        if failed:
            raise failed[0]
        return [t.result() for t in tasks]
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await task.result().gen.aclose()
        raise


async def merge(runs: list[Run]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(prompt index, output)`` of every run as they come; closing this closes every run."""
    if len(runs) == 1:
        run = runs[0]
        try:
            yield 0, run.first
            async for out in run.gen:
                yield 0, out
        finally:
            await run.gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, run: Run) -> None:
        try:
            async for out in run.gen:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as exc:
            queue.put_nowait((i, exc))

    for i, run in enumerate(runs):
        queue.put_nowait((i, run.first))
    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        remaining = len(runs)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # a cancelled pump closes its run's generator on the way out
        await asyncio.gather(*tasks, return_exceptions=True)
        for run in runs:
            await run.gen.aclose()  # runs whose pump never started


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_done(main: asyncio.Future, waiters: dict[asyncio.Future, str]) -> str | None:
    """Wait until ``main`` or a waiter finishes; cancel and settle the rest.

    Returns the name of the waiter that ended it, or None when ``main`` finished first.
    """
    try:
        done, _ = await asyncio.wait({main, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        pending = [t for t in (main, *waiters) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    if main in done:
        return None
    return next(name for waiter, name in waiters.items() if waiter in done)


def _watchers(receive, shutting_down: asyncio.Event | None) -> dict[asyncio.Future, str]:
    watchers = {asyncio.ensure_future(_wait_for_disconnect(receive)): "disconnect"}
    if shutting_down is not None:
        watchers[asyncio.ensure_future(shutting_down.wait())] = "shutdown"
    return watchers


async def until_disconnected(request: Request, work: Awaitable[T],
                             shutting_down: asyncio.Event | None = None) -> T:
    """Await ``work``; if the client disconnects or the server shuts down first, cancel it (which
    aborts its engine requests) and raise ClientDisconnected or ServerShuttingDown."""
    task = asyncio.ensure_future(work)
    ended_by = await _first_done(task, _watchers(request.receive, shutting_down))
    if ended_by == "disconnect":
        raise ClientDisconnected()
    if ended_by == "shutdown":
        raise ServerShuttingDown()
    return task.result()


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and close their generator, as soon as the client disconnects.

    Starlette cancels a stream whose client left but leaves its generator suspended; the engine
    request would then run on until garbage collection. Here the generator is always closed. When
    the server shuts down, an open stream ends at once with an error event and ``[DONE]``.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], shutting_down: asyncio.Event | None = None):
        super().__init__(content)
        self.shutting_down = shutting_down

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            await send(message)
            started = True

        stream = asyncio.ensure_future(self.stream_response(send_tracked))
        try:
            ended_by = await _first_done(stream, _watchers(receive, self.shutting_down))
        finally:
            await self.body_iterator.aclose()
        if ended_by == "shutdown":
            await self._end_for_shutdown(send, started)
        elif ended_by is None and stream.exception() is not None:
            if not isinstance(stream.exception(), OSError):  # OSError: the client went away mid-send
                raise stream.exception()

    async def _end_for_shutdown(self, send, started: bool) -> None:
        body = sse(error_body("the server is shutting down", "server_error", code=503)) + sse("[DONE]")
        try:
            if not started:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": body.encode(), "more_body": False})
        except OSError:
            pass
