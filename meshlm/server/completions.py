"""POST /v1/completions: text (or token ids) in, text out, whole or as server-sent events."""
from __future__ import annotations

import time
from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import JSONResponse

from meshlm.server.errors import APIError
from meshlm.server.protocol import CompletionRequest
from meshlm.server.serving import (ServedModel, choices_of, final_outputs, new_id, sampling_params_or_400,
                                   sse_stream, usage)
from meshlm.server.streams import SSEResponse


async def create_completion(served: ServedModel, body: CompletionRequest, request: Request):
    served.check_model(body.model)
    params = await served.in_pool(sampling_params_or_400, served, body)  # compiles any grammar
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
    echoes = [_prompt_text(served, run.first) if body.echo else "" for run in runs]
    logprobs = _LogprobsFormatter(served) if body.logprobs is not None else None

    def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
        out = {"id": request_id, "object": "text_completion", "created": created, "model": served.name,
               "choices": choices}
        if usage_ is not None or body.include_usage:
            out["usage"] = usage_
        return out

    if body.stream:
        def make_chunks(delta):
            echo = echoes[delta.index // body.n]
            text = (echo if delta.is_first else "") + delta.text
            lp = (logprobs.format(delta.logprobs, len(echo) + delta.text_start)
                  if logprobs and delta.logprobs is not None else None)
            yield chunk([{"index": delta.index, "text": text, "logprobs": lp,
                          "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}])

        def usage_chunk(outputs):
            return chunk([], usage(outputs)) if body.include_usage else None

        return SSEResponse(sse_stream(runs, body.n, make_chunks, usage_chunk), served.shutting_down)

    outputs = await final_outputs(served, request, runs)
    choices = []
    for index, _, c in choices_of(outputs, body.n):
        echo = echoes[index // body.n]
        lp = logprobs.format(c.logprobs, len(echo)) if logprobs and c.logprobs is not None else None
        choices.append({"index": index, "text": echo + c.text, "logprobs": lp,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    result = chunk(choices, usage(outputs))
    result["system_fingerprint"] = None
    return JSONResponse(result)


def _prompt_text(served: ServedModel, first) -> str:
    if first.prompt is not None:
        return first.prompt
    return served.tokenizer.decode(first.prompt_token_ids) if served.tokenizer else ""


class _LogprobsFormatter:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, served: ServedModel):
        self.served = served

    def format(self, entries: list[dict[int, float]], text_offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = text_offset
        for entry in entries:
            sampled, logprob = next(iter(entry.items()))  # the sampled token comes first
            text = self.served.token_text(sampled)
            tokens.append(text)
            token_logprobs.append(logprob)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])
            top.append({self.served.token_text(t): lp for t, lp in ranked})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}
