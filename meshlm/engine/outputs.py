"""What a request gives back. The engine emits deltas (the new tokens and text of the sequences
that progressed in a step); whoever needs the whole output accumulates them with ``add``."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, sampled first
    cumulative_logprob: float | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and self.cumulative_logprob is None:
            self.cumulative_logprob = sum(next(iter(entry.values())) for entry in self.logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: "CompletionOutput") -> None:
        """Append a later delta of the same sample."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + (delta.cumulative_logprob or 0.0)


@dataclass(slots=True)
class RequestOutput:
    """A request's output: the whole of it once accumulated, or one step's delta as the engine
    emits it (then ``outputs`` holds only the samples that progressed)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then per prompt token
    # {token id: logprob}, the prompt token first. It comes once, in the delta of the first token.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def add(self, delta: "RequestOutput") -> None:
        """Fold a later delta of the same request into this output."""
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = list(delta.prompt_logprobs)
        mine = {c.index: c for c in self.outputs}
        for c in delta.outputs:
            if c.index in mine:
                mine[c.index].add(c)
            else:
                self.outputs.append(_copy(c))
        self.outputs.sort(key=lambda c: c.index)
        self.finished = delta.finished
        self.num_cached_tokens = delta.num_cached_tokens

    @classmethod
    def accumulate(cls, delta: "RequestOutput") -> "RequestOutput":
        """A new whole output starting from a first delta (the delta itself is left unchanged)."""
        out = cls(delta.request_id, delta.prompt, delta.prompt_token_ids, [], delta.finished,
                  delta.num_cached_tokens)
        out.add(delta)
        return out


class OutputsOfKind:
    """One request's deltas as the caller asked for them: ``"delta"`` passes each through,
    ``"cumulative"`` (vLLM's default) gives everything so far, a fresh copy each time."""

    def __init__(self, output_kind: str):
        if output_kind not in ("cumulative", "delta"):
            raise ValueError(f"output_kind={output_kind!r}; choose cumulative or delta")
        self.is_delta = output_kind == "delta"
        self._whole: RequestOutput | None = None

    def next(self, delta: RequestOutput) -> RequestOutput:
        if self.is_delta:
            return delta
        if self._whole is None:
            self._whole = RequestOutput.accumulate(delta)
        else:
            self._whole.add(delta)
        return RequestOutput.accumulate(self._whole)  # a copy: the caller may keep it


def _copy(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                            None if c.logprobs is None else list(c.logprobs), c.cumulative_logprob)


@dataclass(slots=True)
class BeamSearchSequence:
    """One beam of ``LLM.beam_search``, as vLLM's: ``tokens`` are the prompt's and the generated
    ones (an ending eos included), ``text`` the generated text (without that eos)."""

    tokens: list[int]
    logprobs: list[dict[int, float]] = field(default_factory=list)  # not collected: always empty
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass(slots=True)
class BeamSearchOutput:
    """The beams of one prompt, best (highest length-penalised score) first."""

    sequences: list[BeamSearchSequence]
