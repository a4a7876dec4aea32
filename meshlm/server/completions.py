"""POST /v1/completions: text (or token ids) in, text out, whole or as server-sent events."""
from __future__ import annotations

import time
from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import JSONResponse

from meshlm.server.errors import APIError
from meshlm.sampling_params import SamplingParams
from meshlm.server.logprobs import LegacyLogprobs, vllm_prompt_logprobs
from meshlm.server.protocol import CompletionRequest
from meshlm.server.serving import (ServedModel, choices_of, final_outputs, new_id, sampling_params_or_400,
                                   sse_stream, usage)
from meshlm.server.streams import SSEResponse


async def create_completion(served: ServedModel, body: CompletionRequest, request: Request):
    served.check_model(body.model)
    params = await served.in_pool(sampling_params_or_400, served, body)  # compiles any grammar
    params = await served.tokenize_bad_words(params)
    try:
        texts = body.prompts()
    except ValueError as exc:
        raise APIError.bad_request(exc, "prompt") from None
    if len(texts) > served.limits.max_prompts:
        raise APIError(HTTPStatus.BAD_REQUEST, f"prompt: {len(texts)} prompts is more than this server's "
                       f"maximum of {served.limits.max_prompts} per request (--max-prompts)", param="prompt")
    prompts = await served.in_pool(served.tokenize, texts)
    served.check_fits(prompts, params, "prompt")
    request_id = new_id("cmpl")
    created = int(time.time())
    runs = await served.start(request, prompts, params, request_id, "prompt")
    shape = _ChoiceShape(served, body, params, [_prompt_text(served, run.first) if body.echo else "" for run in runs])

    def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
        out = {"id": request_id, "object": "text_completion", "created": created, "model": served.name,
               "choices": choices}
        if usage_ is not None or body.include_usage:
            out["usage"] = usage_
        return out

    if body.stream:
        def make_chunks(delta):
            first = runs[delta.index // body.n].first
            yield chunk([shape.choice(delta.index, delta.text, delta.text_start, delta.is_first, delta.logprobs,
                                      first.prompt_token_ids, delta.prompt_logprobs, delta.finish_reason,
                                      delta.stop_reason)])

        def usage_chunk(outputs):
            return chunk([], usage(outputs)) if body.include_usage else None

        return SSEResponse(sse_stream(runs, body.n, make_chunks, usage_chunk), served.shutting_down)

    outputs = await final_outputs(served, request, runs)
    choices = [shape.choice(index, c.text, 0, True, c.logprobs, output.prompt_token_ids, output.prompt_logprobs,
                            c.finish_reason, c.stop_reason)
               for index, output, c in choices_of(outputs, body.n)]
    result = chunk(choices, usage(outputs))
    result["system_fingerprint"] = None
    return JSONResponse(result)


def _prompt_text(served: ServedModel, first) -> str:
    if first.prompt is not None:
        return first.prompt
    return served.tokenizer.decode(first.prompt_token_ids) if served.tokenizer else ""


class _ChoiceShape:
    """One request's choices: the echoed prompt, legacy logprobs (the prompt's too with echo) and
    vLLM's ``prompt_logprobs``."""

    def __init__(self, served: ServedModel, body: CompletionRequest, params: SamplingParams, echoes: list[str]):
        self.served, self.body, self.params, self.echoes = served, body, params, echoes
        self.logprobs = LegacyLogprobs(served) if body.logprobs is not None else None

    def choice(self, index: int, text: str, text_start: int, is_first: bool, entries, prompt_token_ids: list[int],
               prompt_logprobs, finish_reason, stop_reason) -> dict:
        """A choice, or a streamed delta of one (``is_first``: the first, which carries the echo)."""
        body, logprobs = self.body, self.logprobs
        echo = self.echoes[index // body.n]
        lp = logprobs.format(entries, len(echo) + text_start) if logprobs and entries is not None else None
        if body.echo and is_first and lp is not None:
            lp = logprobs.join(logprobs.format_prompt(prompt_token_ids, prompt_logprobs), lp)
        out = {"index": index, "text": (echo if is_first else "") + text, "logprobs": lp,
               "finish_reason": finish_reason, "stop_reason": stop_reason}
        if body.prompt_logprobs is not None and is_first:
            out["prompt_logprobs"] = vllm_prompt_logprobs(self.served, prompt_logprobs, self.params.prompt_logprobs)
        return out
