"""What the completion and chat endpoints share: the served model, starting engine requests,
turning the engine's deltas into per-choice deltas, usage and server-sent events."""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import AsyncIterator, Callable, Sequence, TypeVar

from starlette.requests import Request

from meshlm.engine.outputs import CompletionOutput, RequestOutput
from meshlm.sampling_params import SamplingParams
from meshlm.server.errors import APIError, error_body
from meshlm.server.limits import MAX_CHARS_PER_TOKEN, ServerLimits
from meshlm.server.metrics import ServerMetrics
from meshlm.server.streams import Prompt, Run, merge, sse, start_runs, until_disconnected
from meshlm.server.tools import ToolOptions

T = TypeVar("T")


@dataclass(slots=True)
class ServedModel:
    engine: object  # AsyncLLM
    name: str
    root: str  # the model directory
    max_model_len: int
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    limits: ServerLimits = field(default_factory=ServerLimits)
    tool_options: ToolOptions = field(default_factory=ToolOptions)
    # Set when the server starts shutting down: open requests end at once (503 / an error event).
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    # Parsing, chat templates and tokenization run here, never on the event loop.
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=4, thread_name_prefix="meshlm-server"))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(HTTPStatus.NOT_FOUND, f"the model `{requested}` does not exist; this server "
                           f"serves `{self.name}`", param="model", code="model_not_found")

    async def in_pool(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the server's worker threads (CPU-heavy work: templates, tokenization)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_text_length(self, num_chars: int, param: str) -> None:
        """Refuse, untokenized, a text too long for the context whatever the tokenizer."""
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        if num_chars > limit:
            raise APIError(HTTPStatus.BAD_REQUEST, f"{param}: {num_chars} characters cannot fit the context "
                           f"of {self.max_model_len} tokens (max_model_len); at most {limit} characters "
                           f"({MAX_CHARS_PER_TOKEN} a token) are read", param=param)

    def tokenize(self, prompts: Sequence[str | list[int]]) -> list[Prompt]:
        """Text prompts as token ids (blocking: call through ``in_pool``)."""
        out = []
        for prompt in prompts:
            if isinstance(prompt, str) and self.tokenizer is not None:
                self.check_text_length(len(prompt), "prompt")
                out.append(Prompt(self.tokenizer.encode(prompt), prompt))
            else:  # token ids, or text the engine refuses without a tokenizer
                out.append(Prompt(prompt, None))
            if not isinstance(out[-1].tokens, str) and len(out[-1].tokens) >= self.max_model_len:
                # the engine would refuse it too, but only after copying it on its own thread
                raise APIError(HTTPStatus.BAD_REQUEST, f"prompt: {len(out[-1].tokens)} tokens, but the model's "
                               f"context length (max_model_len) is {self.max_model_len}; at most "
                               f"{self.max_model_len - 1} prompt tokens leave room for one generated token",
                               param="prompt")
        return out

    def check_fits(self, prompts: Sequence[Prompt], params: SamplingParams, source: str) -> None:
        """Refuse a prompt whose tokens plus ``max_tokens`` exceed the context; with ``max_tokens``
        omitted, generation stops at the context instead (finish_reason ``length``)."""
        if params.max_tokens is None:
            return
        for prompt in prompts:
            if isinstance(prompt.tokens, str):
                continue  # text with no tokenizer: the engine refuses it
            num_prompt_tokens = len(prompt.tokens)
            requested = num_prompt_tokens + params.max_tokens
            if requested > self.max_model_len:
                raise APIError(HTTPStatus.BAD_REQUEST, f"the context of this model holds {self.max_model_len} "
                               f"tokens (max_model_len), but this request needs {requested}: "
                               f"{num_prompt_tokens} in the {source} and {params.max_tokens} to generate "
                               f"(max_tokens); shorten the {source} or lower max_tokens to at most "
                               f"{max(self.max_model_len - num_prompt_tokens, 0)}", param="max_tokens")

    async def tokenize_bad_words(self, params: SamplingParams) -> SamplingParams:
        """``params`` with its bad words' token ids, tokenized on a worker thread; 400 if it cannot be."""
        if not params.bad_words:
            return params
        try:
            return await self.in_pool(params.with_bad_words_tokenized, self.tokenizer)
        except ValueError as exc:
            raise APIError.bad_request(exc, "bad_words") from None

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


def sampling_params_or_400(served: ServedModel, body, *args) -> SamplingParams:
    """The body's SamplingParams (``body.sampling_params(*args)``), within the server's limits; 400
    naming the limit otherwise."""
    try:
        params = body.sampling_params(*args)
    except ValueError as exc:
        raise APIError.bad_request(exc) from None
    if params.n > served.limits.max_n:
        raise APIError(HTTPStatus.BAD_REQUEST, f"n={params.n} is more than this server's maximum of "
                       f"{served.limits.max_n} samples per prompt (--max-n)", param="n")
    for name in ("max_tokens", "min_tokens"):
        value = getattr(params, name)
        if value is not None and value > served.max_model_len:
            raise APIError(HTTPStatus.BAD_REQUEST, f"{name}={value} is more than the model's context length "
                           f"of {served.max_model_len} tokens (max_model_len)", param=name)
    return params


@dataclass(slots=True)
class ChoiceDelta:
    index: int  # the choice's index: prompt index * n + sample index
    text: str  # new text since the last delta
    text_start: int  # where ``text`` starts in the choice's whole text
    logprobs: list[dict[int, float]] | None  # entries of the tokens since the last delta
    finish_reason: str | None
    stop_reason: str | int | None
    is_first: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with the first delta, when asked


class DeltaTracker:
    """Turns the engine's deltas into choice deltas (one per choice whose text grew or that just
    finished) and keeps each prompt's whole output so far, for the usage numbers."""

    def __init__(self, n: int):
        self.n = n
        self.whole: dict[int, RequestOutput] = {}  # prompt index -> its output so far
        self._text_len: dict[int, int] = {}
        self._held_logprobs: dict[int, list[dict[int, float]]] = {}  # of tokens whose text is held back

    def deltas(self, prompt_index: int, delta: RequestOutput) -> list[ChoiceDelta]:
        accumulate(self.whole, prompt_index, delta)
        out = []
        for c in delta.outputs:
            index = prompt_index * self.n + c.index
            if c.logprobs is not None:
                self._held_logprobs.setdefault(index, []).extend(c.logprobs)
            if not c.text and c.finish_reason is None:
                continue  # text held back (a stop string may be forming, or a partial character)
            start = self._text_len.get(index, 0)
            logprobs = self._held_logprobs.pop(index, []) if c.logprobs is not None else None
            is_first = index not in self._text_len
            out.append(ChoiceDelta(index, c.text, start, logprobs, c.finish_reason, c.stop_reason, is_first,
                                   self.whole[prompt_index].prompt_logprobs if is_first else None))
            self._text_len[index] = start + len(c.text)
        return out


def accumulate(whole: dict[int, RequestOutput], key: int, delta: RequestOutput) -> None:
    """Fold ``delta`` into ``whole[key]``."""
    if key in whole:
        whole[key].add(delta)
    else:
        whole[key] = RequestOutput.accumulate(delta)


async def final_outputs(served: ServedModel, request: Request, runs: list[Run]) -> list[RequestOutput]:
    """Wait for every run to finish (aborting them all if the client disconnects)."""
    async def collect():
        final: dict[int, RequestOutput] = {}
        stream = merge(runs)
        try:
            async for i, delta in stream:
                accumulate(final, i, delta)
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
    stream = merge(runs)
    try:
        async for i, out in stream:
            for delta in tracker.deltas(i, out):
                for chunk in make_chunks(delta):
                    yield sse(chunk)
        chunk = usage_chunk([tracker.whole[i] for i in range(len(runs))])
        if chunk is not None:
            yield sse(chunk)
    except RuntimeError as exc:
        yield sse(error_body(str(exc), "server_error", code=HTTPStatus.INTERNAL_SERVER_ERROR.value))
    finally:
        await stream.aclose()
    yield sse("[DONE]")
