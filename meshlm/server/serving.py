"""What the completion and chat endpoints share: the served model, starting engine requests,
turning cumulative outputs into per-choice deltas, usage and server-sent events."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import AsyncIterator, Sequence

from starlette.requests import Request

from meshlm.engine.outputs import CompletionOutput, RequestOutput
from meshlm.sampling_params import SamplingParams
from meshlm.server.errors import APIError, error_body
from meshlm.server.metrics import ServerMetrics
from meshlm.server.streams import Run, merge, sse, start_runs, until_disconnected


@dataclass(slots=True)
class ServedModel:
    engine: object  # AsyncLLM
    name: str
    root: str  # the model directory
    max_model_len: int
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    # Set when the server starts shutting down: open requests end at once (503 / an error event).
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(HTTPStatus.BAD_REQUEST, f"the model `{requested}` does not exist; this server "
                           f"serves `{self.name}`", param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False) if self.tokenizer else ""

    async def start(self, request: Request, prompts: Sequence, params: SamplingParams,
                    request_id: str, param: str) -> list[Run]:
        """Start the engine requests; a bad prompt answers 400 naming ``param``."""
        try:
            return await until_disconnected(request, start_runs(self.engine, prompts, params, request_id,
                                                                self.metrics), self.shutting_down)
        except ValueError as exc:
            raise APIError.bad_request(exc, param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params_or_400(body) -> SamplingParams:
    try:
        return body.sampling_params()
    except ValueError as exc:
        raise APIError.bad_request(exc) from None


@dataclass(slots=True)
class ChoiceDelta:
    index: int  # the choice's index: prompt index * n + sample index
    text: str  # new text since the last delta
    text_start: int  # where ``text`` starts in the choice's whole text
    logprobs: list[dict[int, float]] | None  # entries of the tokens since the last delta
    finish_reason: str | None
    stop_reason: str | int | None
    is_first: bool


class DeltaTracker:
    """Turns cumulative outputs into deltas: one per choice whose text grew or that just finished."""

    def __init__(self, n: int):
        self.n = n
        self._text_len: dict[int, int] = {}
        self._num_logprobs: dict[int, int] = {}
        self._finished: set[int] = set()

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        out = []
        for c in output.outputs:
            index = prompt_index * self.n + c.index
            if index in self._finished:
                continue
            start = self._text_len.get(index, 0)
            if len(c.text) == start and c.finish_reason is None:
                continue  # text held back (a stop string may be forming, or a partial character)
            logprobs = None
            if c.logprobs is not None:
                first_lp = self._num_logprobs.get(index, 0)
                logprobs = c.logprobs[first_lp:]
                self._num_logprobs[index] = len(c.logprobs)
            out.append(ChoiceDelta(index, c.text[start:], start, logprobs, c.finish_reason, c.stop_reason,
                                   index not in self._text_len))
            self._text_len[index] = len(c.text)
            if c.finish_reason is not None:
                self._finished.add(index)
        return out


async def final_outputs(served: ServedModel, request: Request, runs: list[Run]) -> list[RequestOutput]:
    """Wait for every run to finish (aborting them all if the client disconnects)."""
    async def collect():
        final: dict[int, RequestOutput] = {}
        stream = merge(runs)
        try:
            async for i, out in stream:
                if out.finished:
                    final[i] = out
        finally:
            await stream.aclose()
        return [final[i] for i in range(len(runs))]
    return await until_disconnected(request, collect(), served.shutting_down)


def usage(outputs: Sequence[RequestOutput]) -> dict:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choices_of(outputs: Sequence[RequestOutput], n: int) -> list[tuple[int, RequestOutput, CompletionOutput]]:
    """``(choice index, its request output, its completion)`` in index order."""
    return [(i * n + c.index, o, c) for i, o in enumerate(outputs) for c in o.outputs]


async def sse_stream(runs: list[Run], n: int, make_chunks, usage_chunk) -> AsyncIterator[str]:
    """The event stream of every run: ``make_chunks(delta)`` gives each delta's chunks,
    ``usage_chunk(outputs)`` the final usage chunk (or None), then ``[DONE]``.

    A failure of the engine mid-stream ends the stream with an error event, as vLLM does.
    """
    tracker = DeltaTracker(n)
    last: dict[int, RequestOutput] = {}
    stream = merge(runs)
    try:
        async for i, out in stream:
            last[i] = out
            for delta in tracker.deltas(i, out):
                for chunk in make_chunks(delta):
                    yield sse(chunk)
        chunk = usage_chunk([last[i] for i in range(len(runs))])
        if chunk is not None:
            yield sse(chunk)
    except RuntimeError as exc:
        yield sse(error_body(str(exc), "server_error", code=HTTPStatus.INTERNAL_SERVER_ERROR.value))
    finally:
        await stream.aclose()
    yield sse("[DONE]")
