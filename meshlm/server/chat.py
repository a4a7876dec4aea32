"""POST /v1/chat/completions: messages through the model's chat template, a message (or deltas) out."""
from __future__ import annotations

import time
from http import HTTPStatus

from starlette.requests import Request
from starlette.responses import JSONResponse

from meshlm.server.logprobs import vllm_prompt_logprobs
from meshlm.server.errors import APIError
from meshlm.server.protocol import ChatCompletionRequest
from meshlm.server.serving import (ServedModel, choices_of, final_outputs, new_id, sampling_params_or_400,
                                   sse_stream, usage)
from meshlm.server.streams import Prompt, SSEResponse


async def create_chat_completion(served: ServedModel, body: ChatCompletionRequest, request: Request):
    served.check_model(body.model)
    params = await served.tokenize_bad_words(sampling_params_or_400(served, body))
    prompt = Prompt(await served.in_pool(_render, served, body), None)
    served.check_fits([prompt], params, "messages")
    request_id = new_id("chatcmpl")
    created = int(time.time())
    runs = await served.start(request, [prompt], params, request_id, "messages")
    top_k = body.top_logprobs or 0

    def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
        out = {"id": request_id, "object": "chat.completion.chunk", "created": created,
               "model": served.name, "choices": choices}
        if usage_ is not None or body.include_usage:
            out["usage"] = usage_
        return out

    if body.stream:
        def make_chunks(delta):
            if delta.is_first:  # OpenAI opens every choice with the role
                yield chunk([{"index": delta.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            message = {"content": delta.text} if delta.text else {}
            lp = _logprobs(served, delta.logprobs, top_k) if delta.logprobs is not None else None
            if message or delta.finish_reason is not None:
                yield chunk([{"index": delta.index, "delta": message, "logprobs": lp,
                              "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}])

        def usage_chunk(outputs):
            return chunk([], usage(outputs)) if body.include_usage else None

        return SSEResponse(sse_stream(runs, body.n, make_chunks, usage_chunk), served.shutting_down)

    outputs = await final_outputs(served, request, runs)
    choices = [{"index": index, "message": {"role": "assistant", "content": c.text},
                "logprobs": _logprobs(served, c.logprobs, top_k) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
               for index, _, c in choices_of(outputs, body.n)]
    result = {"id": request_id, "object": "chat.completion", "created": created, "model": served.name,
              "choices": choices, "usage": usage(outputs), "system_fingerprint": None}
    if body.prompt_logprobs is not None:  # vLLM's extra: the rendered prompt's tokens
        result["prompt_logprobs"] = vllm_prompt_logprobs(served, outputs[0].prompt_logprobs, params.prompt_logprobs)
    return JSONResponse(result)


def _render(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    """The conversation through the chat template, as token ids (blocking: run it in the pool)."""
    import jinja2
    if served.tokenizer is None:
        raise APIError(HTTPStatus.BAD_REQUEST, "the tokenizer is off (skip_tokenizer_init): chat needs "
                       "one; use /v1/completions with token ids", param="messages")
    messages = body.template_messages()
    served.check_text_length(sum(len(m["content"]) + len(m.get("name") or "") for m in messages), "messages")
    try:
        return served.tokenizer.encode_chat(messages, body.add_generation_prompt)
    except (ValueError, TypeError, jinja2.TemplateError) as exc:  # the template refused them
        raise APIError(HTTPStatus.BAD_REQUEST, f"messages: {exc}", param="messages") from None


def _logprobs(served: ServedModel, entries: list[dict[int, float]], top_k: int) -> dict:
    """Chat's logprobs object: per token, its logprob and the ``top_k`` most likely tokens."""
    def item(token_id: int, logprob: float) -> dict:
        text = served.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for entry in entries:
        sampled, logprob = next(iter(entry.items()))  # the sampled token comes first
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:top_k]
        content.append({**item(sampled, logprob), "top_logprobs": [item(t, lp) for t, lp in ranked]})
    return {"content": content}
