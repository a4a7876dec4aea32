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
from meshlm.server.tool_stream import ToolCallStream
from meshlm.server.tools import ToolMode


async def create_chat_completion(served: ServedModel, body: ChatCompletionRequest, request: Request):
    served.check_model(body.model)
    tools = _tool_mode_or_400(served, body)
    params = await served.in_pool(sampling_params_or_400, served, body, tools)  # compiles any grammar
    params = await served.tokenize_bad_words(params)
    prompt = Prompt(await served.in_pool(_render, served, body, tools), None)
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
        tool_streams: dict[int, ToolCallStream] = {}

        def make_chunks(delta):
            if delta.is_first:  # OpenAI opens every choice with the role
                yield chunk([{"index": delta.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            stream = tool_streams.setdefault(delta.index, ToolCallStream(tools))
            messages, finish_reason = stream.feed(delta.text, delta.finish_reason)
            lp = _logprobs(served, delta.logprobs, top_k) if delta.logprobs is not None else None
            if delta.finish_reason is not None and not messages:
                messages = [{}]  # the finish_reason still needs its chunk
            for i, message in enumerate(messages):
                last = i == len(messages) - 1
                yield chunk([{"index": delta.index, "delta": message, "logprobs": lp if i == 0 else None,
                              "finish_reason": finish_reason if last else None,
                              "stop_reason": delta.stop_reason if last else None}])

        def usage_chunk(outputs):
            return chunk([], usage(outputs)) if body.include_usage else None

        return SSEResponse(sse_stream(runs, body.n, make_chunks, usage_chunk), served.shutting_down)

    outputs = await final_outputs(served, request, runs)
    result = {"id": request_id, "object": "chat.completion", "created": created, "model": served.name,
              "choices": _choices(served, outputs, body.n, tools, top_k), "usage": usage(outputs),
              "system_fingerprint": None}
    if body.prompt_logprobs is not None:  # vLLM's extra: the rendered prompt's tokens
        result["prompt_logprobs"] = vllm_prompt_logprobs(served, outputs[0].prompt_logprobs, params.prompt_logprobs)
    return JSONResponse(result)


def _tool_mode_or_400(served: ServedModel, body: ChatCompletionRequest) -> ToolMode:
    try:
        return body.tool_mode(served.tool_options.enable_auto_tool_choice, served.tool_options.tool_call_parser)
    except ValueError as exc:
        raise APIError.bad_request(exc) from None


def _choices(served: ServedModel, outputs, n: int, tools: ToolMode, top_k: int) -> list[dict]:
    """The choices of a whole answer: each message with its text or its tool calls."""
    choices = []
    for index, _, c in choices_of(outputs, n):
        message, finish_reason = tools.message(c.text, c.finish_reason)
        choices.append({"index": index, "message": message,
                        "logprobs": _logprobs(served, c.logprobs, top_k) if c.logprobs is not None else None,
                        "finish_reason": finish_reason, "stop_reason": c.stop_reason})
    return choices


def _render(served: ServedModel, body: ChatCompletionRequest, tools: ToolMode) -> list[int]:
    """The conversation through the chat template, as token ids (blocking: run it in the pool)."""
    import jinja2
    if served.tokenizer is None:
        raise APIError(HTTPStatus.BAD_REQUEST, "the tokenizer is off (skip_tokenizer_init): chat needs "
                       "one; use /v1/completions with token ids", param="messages")
    messages = body.template_messages()
    served.check_text_length(sum(len(m["content"]) + len(m.get("name") or "") for m in messages), "messages")
    try:
        # The template sees the tools, as transformers' apply_chat_template(tools=...) passes them.
        template_tools = [{"type": "function", "function": f} for f in tools.tools] or None
        return served.tokenizer.encode_chat(messages, body.add_generation_prompt, tools=template_tools)
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
