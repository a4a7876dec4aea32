"""Forks in the scheduler: ``n > 1`` samples that start from their first sample's prompt blocks,
and beams of beam search that continue a beam copy-on-write."""
from __future__ import annotations

from meshlm.engine.request import Request, RequestStatus

__all__ = ["ForkScheduling"]


class ForkScheduling:
    """Methods of the Scheduler (which holds ``kv``, ``_requests``, ``_running`` and ``_waiting``);
    ``ScheduledChunk`` is the scheduler's (an annotation only: no import back up)."""

    def extend_beam(self, beam: Request, token_id: int, child: Request | None = None) -> None:
        """Continue ``beam`` with ``token_id``, or, given ``child`` (a fresh beam), fork ``child``
        from ``beam`` (its tokens, blocks shared copy-on-write) and continue the child instead.
        Consumes ``beam``'s candidates unless a child is given: fork every child first."""
        if child is not None:
            assert not child.block_ids and child.request_id not in self._requests, child.request_id
            child.output_token_ids = list(beam.output_token_ids)
            self.kv.fork(beam, child)
            child.num_computed_tokens = beam.num_computed_tokens
            child.status = beam.status
            child.num_preemptions = beam.num_preemptions
            self._requests[child.request_id] = child
            if beam.status == RequestStatus.RUNNING:
                at = self._running.index(beam) + 1
                self._running.insert(at, child)
            else:  # preempted: it waits beside its parent
                self._waiting.insert(self._waiting.index(beam) + 1, child)
            beam = child
        beam.beam_candidates = None
        beam.output_token_ids.append(token_id)

    def _fork(self, chunk: ScheduledChunk) -> None:
        """The chunk samples its request's first token: its pending forks become running
        sequences that share its blocks and sample their own first token in this step."""
        parent = chunk.request
        assert not parent.output_token_ids, f"{parent.request_id} forks after its first token"
        for child in parent.forks:
            self.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_output_placeholders = 1
            child.num_cached_prompt_tokens = parent.num_cached_prompt_tokens
            child.status = RequestStatus.RUNNING
            self._requests[child.request_id] = child
        chunk.forked, parent.forks = parent.forks, []
