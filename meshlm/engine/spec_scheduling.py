"""Speculative decoding's part of the scheduler: which draft tokens a decode runs, and how a
verify step's tokens are appended (rejected drafts rolled back); and the logprobs a step's result
gives a request (``ScheduledChunk`` is the scheduler's: an annotation only, no import back up)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from meshlm.engine.request import Request, RequestStatus
from meshlm.protocol import StepResult

__all__ = ["Proposer", "SpecDecodeStats", "SpeculativeScheduling", "prompt_logprobs", "token_logprobs"]


class Proposer(Protocol):
    """Drafts for a sequence (NgramProposer, DraftModelProposer)."""

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        """At most ``max_drafts`` tokens that may follow ``token_ids``; empty for none."""


@dataclass(slots=True)
class SpecDecodeStats:
    """Speculative decoding so far: verify rows, drafts scored, drafts accepted."""

    num_verify_rows: int = 0  # sequence steps that scored drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_tokens_per_verify_row(self) -> float:
        """Tokens a verify row emits on average: its accepted drafts plus the one it samples."""
        return 1 + self.num_accepted_tokens / self.num_verify_rows if self.num_verify_rows else 0.0


class SpeculativeScheduling:
    """Methods of the Scheduler (which holds ``proposer``, ``spec_stats`` and ``kv``)."""

    def _append_tokens(self, request: Request, num_drafts: int, result: StepResult, row: int
                       ) -> RequestStatus | None:
        """Append row ``row``'s tokens until one finishes the request (the rest are dropped); after
        a verify step, roll back what the rejected drafts computed."""
        tokens = result.row_tokens(row)
        status = None
        for index, token_id in enumerate(tokens):
            logprobs = token_logprobs(result, row, token_id, request) if index == len(tokens) - 1 else None
            status = request.append_token(token_id, logprobs)
            if status is not None:
                break
        if num_drafts:
            stats = self.spec_stats
            stats.num_verify_rows += 1
            stats.num_draft_tokens += num_drafts
            stats.num_accepted_tokens += len(tokens) - 1
            if status is None and request.status == RequestStatus.RUNNING:
                # The KV holds the last known token's predecessors: the accepted drafts are computed.
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
                self.kv.free_excess_blocks(request)
        return status

    def _draft_tokens(self, request: Request, budget: int, draft_budget: int) -> list[int]:
        """The proposer's drafts for a decode of ``request`` whose last token is known; none for a
        request whose sampling reads its history, reports logprobs or follows a grammar, or still under
        min_tokens.
        ``draft_budget`` caps them too (the step's logits rows stay within max_batch_size)."""
        params = request.params
        if (self.proposer is None or request.num_uncomputed_tokens != 1 or request.num_output_placeholders
                or params.needs_output_history or params.logprobs is not None
                or params.structured_outputs is not None  # its grammar matcher cannot roll back
                or len(request.output_token_ids) < params.min_tokens):
            return []
        # A step emits at most 1 + drafts tokens; they must fit max_tokens and the context.
        limit = min(budget - 1, draft_budget)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens - len(request.output_token_ids) - 1)
        if request.max_model_len is not None:
            limit = min(limit, request.max_model_len - request.num_tokens - 1)
        drafts = self.proposer.propose(request.all_token_ids, limit) if limit > 0 else []
        return drafts if drafts and self.kv.can_allocate(request, 1 + len(drafts)) else []


def token_logprobs(result: StepResult, row: int, token_id: int, request: Request) -> dict[int, float] | None:
    """``{sampled token: logprob, then the top-k tokens}`` of one row, when the request asked."""
    k = request.params.logprobs
    if k is None or result.logprobs is None:
        return None
    entry = {token_id: float(result.logprobs[row])}
    if k and result.top_token_ids is not None:
        top = zip(result.top_token_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist())
        entry.update({t: lp for t, lp in top if t != token_id})
    return entry


def prompt_logprobs(result: StepResult, first_row: int, chunk: ScheduledChunk) -> list[dict[int, float]]:
    """``{prompt token: logprob, then the top-k tokens}`` of each position a scheduled chunk scored."""
    request, k = chunk.request, chunk.request.params.prompt_logprobs
    targets = request.prompt_token_ids[chunk.first_scored + 1:chunk.first_scored + 1 + chunk.num_scored]
    rows = range(first_row, first_row + chunk.num_scored)
    entries = []
    for row, target in zip(rows, targets):
        entry = {target: float(result.prompt_logprobs[row])}
        if k and result.prompt_top_token_ids is not None:
            top = zip(result.prompt_top_token_ids[row, :k].tolist(), result.prompt_top_logprobs[row, :k].tolist())
            entry.update({t: lp for t, lp in top if t != target})
        entries.append(entry)
    return entries
