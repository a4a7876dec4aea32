"""A sequence as rank 0 tracks it: its tokens, its progress through the KV cache, its blocks, and
why it stopped. The scheduler owns every Request: it appends sampled tokens
(``Scheduler.update_from_output``), which decides here whether the sequence is finished."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from meshlm.engine.outputs import CompletionOutput
from meshlm.engine.tokenizer import IncrementalDetokenizer
from meshlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # eos, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"

    def __init__(self, value: str) -> None:
        # An attribute of each member, not a property: the step loop asks it several times a sequence.
        self.is_finished = value not in ("waiting", "running")


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated.

    Invariant: the KV cache holds (or a step already launched writes) the first
    ``num_computed_tokens`` of the sequence; the scheduler advances it when it schedules a chunk.
    A scheduled chunk that samples adds an output placeholder (``num_output_placeholders``, as
    vLLM's): a token the device is producing but rank 0 has not appended yet. With the overlapped
    step loop the next step is scheduled while that token is in flight, so the scheduler counts
    it (``num_tokens_with_placeholders``); when it arrives, ``append_token`` replaces the
    placeholder. After preemption (recompute) ``num_computed_tokens`` drops to 0 and the outputs
    so far are kept, so the sequence resumes where it stopped.

    Text: each appended token is detokenized once; the new text waits in ``_pending_text`` until
    ``take_output`` hands it out, minus a tail that could still become a stop string.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int = 0
    index: int = 0  # which of its group's n samples
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None
    detokenizer: IncrementalDetokenizer | None = None  # None: the tokenizer is off
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_output_placeholders: int = 0  # sampled tokens on their way to rank 0 (see the docstring)
    block_ids: list[int] = field(default_factory=list)
    # Bumped whenever block_ids changes other than by appending (a copy-on-write swap, a free, a
    # cut): a copy of the table kept in step by appends alone must then be rebuilt.
    block_table_version: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0
    # With params.prompt_logprobs: [None] (the first token's), then one entry per scored prompt
    # token, the token's own logprob first; complete at num_prompt_tokens entries.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_prompt_positions_scored: int = 0  # prompt positions whose scores are known or on the way
    # Sequences that start as copies of this one at its first sampled token (``n > 1``): they
    # share its prompt's KV blocks instead of prefilling it again (Scheduler._fork).
    forks: list["Request"] = field(default_factory=list)
    # A beam of beam search: its sampled rows give candidates (``beam_candidates``: the top
    # (token, logprob) pairs), and the beam search (engine/beam_search.py) picks its next token.
    is_beam: bool = False
    beam_candidates: list[tuple[int, float]] | None = None
    _num_tokens_taken: int = 0  # output tokens already handed out by take_output
    _is_finish_taken: bool = False  # take_output has handed out the finish reason
    _released_tail: str = ""  # the end of the text handed out, where a stop string may begin
    _pending_text: str = ""
    _pending_logprobs: list[dict[int, float]] | None = None

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """The known tokens: prompt and appended outputs."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        """The known tokens and the outputs still in flight: what the scheduler plans with."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_output_placeholders

    @property
    def max_length(self) -> int | None:
        """The most tokens this sequence can reach: its prompt and ``max_tokens``, within the
        context length; None when neither bounds it."""
        limits = [self.max_model_len]
        if self.params.max_tokens is not None:
            limits.append(self.num_prompt_tokens + self.params.max_tokens)
        limits = [n for n in limits if n is not None]
        return min(limits) if limits else None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens_with_placeholders - self.num_computed_tokens

    @property
    def is_capped_by_placeholders(self) -> bool:
        """Whether the tokens in flight already reach ``max_tokens`` or the context length: the
        sequence finishes when they land, so scheduling another token for it would be wasted."""
        if not self.num_output_placeholders:
            return False
        max_tokens = self.params.max_tokens
        if max_tokens is not None and len(self.output_token_ids) + self.num_output_placeholders >= max_tokens:
            return True
        return self.max_model_len is not None and self.num_tokens_with_placeholders >= self.max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt positions it must score are still to run (so no prefix may be skipped)."""
        return (self.params.prompt_logprobs is not None
                and self.num_prompt_positions_scored < self.num_prompt_tokens - 1)

    def positions_to_score(self, start: int, num_new_tokens: int) -> tuple[int, int]:
        """``(first, count)``: the positions of a chunk ``start : start + num_new_tokens`` whose
        logits score the next prompt token and are not scored yet; marks them scored. Position ``p``
        scores token ``p + 1``; the last prompt position samples instead."""
        if self.params.prompt_logprobs is None:
            return start, 0
        first = max(start, self.num_prompt_positions_scored)
        end = min(start + num_new_tokens, self.num_prompt_tokens - 1)
        if end <= first:
            return first, 0
        self.num_prompt_positions_scored = end
        return first, end - first

    # --- the output ----------------------------------------------------------------------------
    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> RequestStatus | None:
        """Record one sampled token (``logprobs``: the sampled token's first, then the top ones). The
        scheduler has taken away the placeholder its chunk added.

        Returns the finished status when this token ends the sequence, else None; the caller
        (the scheduler) then finishes it.
        """
        params = self.params
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            if self._pending_logprobs is None:
                self._pending_logprobs = []
            self._pending_logprobs.append(logprobs)
        num_out = len(self.output_token_ids)
        may_stop = num_out >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            return self._stopped(None)
        if may_stop and token_id in params.stop_token_ids:
            return self._stopped(token_id)
        if self.detokenizer is not None:
            self._pending_text += self.detokenizer.add(self.output_token_ids)
            if may_stop and params.stop and self._cut_at_stop_string():
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _stopped(self, stop_reason: str | int | None) -> RequestStatus:
        self.stop_reason = stop_reason
        return RequestStatus.FINISHED_STOPPED

    def _cut_at_stop_string(self) -> bool:
        """Search the pending text (and the released tail before it) for the earliest stop string."""
        params = self.params
        window = self._released_tail + self._pending_text
        best = None
        for stop in params.stop:
            pos = window.find(stop)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return False
        pos, stop = best
        end = pos + len(stop) if params.include_stop_str_in_output else pos
        # A stop string never starts inside released text unless it is shown in the output.
        self._pending_text = window[len(self._released_tail):max(end, len(self._released_tail))]
        self.stop_reason = stop
        return True

    def take_output(self) -> CompletionOutput | None:
        """What this sequence produced since the last call (a delta), or None when nothing new
        can be handed out yet. While running, text that could still become a stop string is held."""
        if self._is_finish_taken:
            return None
        num_new = len(self.output_token_ids) - self._num_tokens_taken
        finished = self._is_finish_taken = self.status.is_finished
        if self.params.stop:  # text that may begin a stop string is held back
            text = self._release_text(finished)
        else:
            text, self._pending_text = self._pending_text, ""
        if num_new == 0 and not text and not finished:
            return None
        token_ids = self.output_token_ids[self._num_tokens_taken:]
        self._num_tokens_taken = len(self.output_token_ids)
        logprobs, self._pending_logprobs = self._pending_logprobs, None
        if self.params.logprobs is not None and logprobs is None:
            logprobs = []
        finish_reason = self.status.value if finished else None
        return CompletionOutput(self.index, text, token_ids, finish_reason,
                                self.stop_reason if finished else None, logprobs)

    def _release_text(self, finished: bool) -> str:
        """The pending text that can be handed out: all of it once finished, else all but the
        longest stop string's length minus one (unless stop strings are shown in the output)."""
        hold = 0 if finished else self._hold_back()
        text = self._pending_text[:max(0, len(self._pending_text) - hold)]
        self._pending_text = self._pending_text[len(text):]
        longest_stop = max(len(s) for s in self.params.stop)
        self._released_tail = (self._released_tail + text)[-longest_stop:]
        return text

    def _hold_back(self) -> int:
        params = self.params
        if not params.stop or params.include_stop_str_in_output:
            return 0
        return max(len(s) for s in params.stop) - 1
