"""What a request gives back, and the per-sequence bookkeeping on rank 0 that produces it:
detokenization, stop tokens, stop strings and length limits."""
from __future__ import annotations

from dataclasses import dataclass, field

from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, sampled first
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0


@dataclass(slots=True, eq=False)
class SequenceOutputState:
    """Rank 0's view of one sequence's output: text so far and why it stopped."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer | None  # None when the tokenizer is off
    eos_token_ids: frozenset[int]
    max_model_len: int
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    status: RequestStatus | None = None
    _hold_back: int = field(default=0)

    @classmethod
    def create(cls, request: Request, index: int, tokenizer: Tokenizer | None, eos_token_ids,
               max_model_len: int):
        params = request.params
        detokenizer = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, params.skip_special_tokens)
        state = cls(request, index, detokenizer, frozenset(eos_token_ids), max_model_len)
        if params.logprobs is not None:
            state.logprobs = []
        if params.stop and not params.include_stop_str_in_output:
            # A stop string may be forming at the end of the text: keep that much unreleased.
            state._hold_back = max(len(s) for s in params.stop) - 1
        return state

    def append(self, token_id: int, logprob: float | None = None, top: dict[int, float] | None = None) -> None:
        """Record one sampled token and decide whether the sequence is finished."""
        request, params = self.request, self.request.params
        request.output_token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            entry = {token_id: logprob}
            entry.update({t: lp for t, lp in (top or {}).items() if t != token_id})
            self.logprobs.append(entry)
            self.cumulative_logprob += logprob
        num_out = len(request.output_token_ids)
        may_stop = num_out >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            return self._finish(RequestStatus.FINISHED_STOPPED, None)
        if may_stop and token_id in params.stop_token_ids:
            return self._finish(RequestStatus.FINISHED_STOPPED, token_id)
        delta = self.detokenizer.add(token_id) if self.detokenizer is not None else ""
        if delta:
            start = max(0, len(self.text) - self._hold_back_max())
            self.text += delta
            if may_stop and params.stop and self._check_stop_strings(start):
                return
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return self._finish(RequestStatus.FINISHED_LENGTH, None)
        if request.num_tokens >= self.max_model_len:
            return self._finish(RequestStatus.FINISHED_LENGTH, None)

    def _hold_back_max(self) -> int:
        params = self.request.params
        return max((len(s) for s in params.stop), default=0) if params.stop else 0

    def _check_stop_strings(self, search_from: int) -> bool:
        params = self.request.params
        best = None
        for stop in params.stop:
            pos = self.text.find(stop, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return False
        pos, stop = best
        self.text = self.text[:pos + len(stop)] if params.include_stop_str_in_output else self.text[:pos]
        self._finish(RequestStatus.FINISHED_STOPPED, stop)
        return True

    def _finish(self, status: RequestStatus, stop_reason) -> None:
        # The scheduler owns request.status; the coordinator hands it this status.
        self.status = status
        self.finish_reason = status.value
        self.stop_reason = stop_reason

    def abort(self) -> None:
        self._finish(RequestStatus.FINISHED_ABORTED, None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> CompletionOutput:
        """The output so far; while running, text that may still turn into a stop string is held back."""
        text = self.text
        if not self.finished and self._hold_back:
            text = text[:max(0, len(text) - self._hold_back)]
        logprobs = list(self.logprobs) if self.logprobs is not None else None
        return CompletionOutput(self.index, text, list(self.request.output_token_ids), self.finish_reason,
                                self.stop_reason, logprobs,
                                self.cumulative_logprob if self.logprobs is not None else None)
