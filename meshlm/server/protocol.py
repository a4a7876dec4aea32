"""Request bodies of the OpenAI API (with vLLM's extra sampling fields), as pydantic models.

Each request turns itself into ``SamplingParams``; range checks stay there, so the HTTP API and
``LLM(...)`` accept exactly the same values. Unknown fields are kept and logged, as vLLM does.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from meshlm.sampling_params import MAX_LOGPROBS, SamplingParams
from meshlm.server.structured import structured_outputs_of
from meshlm.server.tools import ToolMode, tool_mode


# Unknown fields are kept (and logged); NaN and infinities are refused wherever a number goes.
_CONFIG = ConfigDict(extra="allow", allow_inf_nan=False)
# Token ids travel to the sampler as tensors: keep them in int32.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """The fields both endpoints share."""

    model_config = _CONFIG

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: 1.0, as OpenAI
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, ignored
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}
    # vLLM's extras
    top_k: int | None = None  # 0 and -1 also mean "off", as in vLLM
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = None
    bad_words: str | list[str] | None = None
    prompt_logprobs: int | None = None
    # Structured outputs: OpenAI's response_format, vLLM's guided_* extras and structured_outputs
    response_format: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None

    def check_common(self) -> None:
        """Raise ValueError for combinations pydantic cannot see."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None, structured_outputs=None) -> SamplingParams:
        top_k = None if self.top_k in (0, -1) else self.top_k
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos, stop=self.stop,
            stop_token_ids=self.stop_token_ids, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logit_bias=self.logit_bias,
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            structured_outputs=self._structured_outputs(structured_outputs))

    def _structured_outputs(self, from_tools):
        requested = structured_outputs_of(self)
        if from_tools is not None and requested is not None:
            raise ValueError("tool_choice: a required or named tool call is itself structured output; "
                             "it cannot be combined with response_format, guided_* or structured_outputs")
        return from_tools or requested

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


Prompt = str | list[int]


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None  # with use_beam_search: the beam width (default n); else must equal n
    # vLLM's beam search extras
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def prompts(self) -> list[Prompt]:
        """The prompts as a list: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)

    def sampling_params(self) -> SamplingParams:
        self.check_common()
        if self.suffix:
            raise ValueError("suffix: not supported")
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:  # the echoed prompt's tokens get logprobs too
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        if self.use_beam_search and self.logprobs is not None:
            raise ValueError("logprobs: not returned with use_beam_search")
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs).replace(
            best_of=self.best_of, use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping)


class FunctionCallIn(BaseModel):
    model_config = _CONFIG
    name: str
    arguments: str | dict = "{}"


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, as the client sends it back."""

    model_config = _CONFIG
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def as_template_dict(self) -> dict:
        # Chat templates write the arguments with tojson: give them the object, not its text.
        arguments = self.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        call = {"type": "function", "function": {"name": self.function.name, "arguments": arguments}}
        return call if self.id is None else {"id": self.id, **call}


class TextPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers

    def as_template_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.as_template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # None: "auto" with tools, else "none"
    parallel_tool_calls: bool = True

    def sampling_params(self, tools: ToolMode | None = None) -> SamplingParams:
        """The sampling parameters; ``tools`` (from ``tool_mode``) constrains a required or named call."""
        self.check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be an integer in [0, {MAX_LOGPROBS}]")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs,
                                     structured_outputs=tools.structured_outputs() if tools else None)

    def tool_mode(self, enable_auto_tool_choice: bool, parser: str | None) -> ToolMode:
        """How this request uses its tools, under the server's flags (ValueError for a bad combination)."""
        return tool_mode(self.tools, self.tool_choice, self.parallel_tool_calls, enable_auto_tool_choice, parser)

    def template_messages(self) -> list[dict]:
        return [m.as_template_dict() for m in self.messages]
