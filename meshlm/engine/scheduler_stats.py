"""The scheduler's account of the steps it ran (``meshlm bench throughput`` reads it)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerStats:
    """Steps run so far and what they held: a benchmark's account of where its time went.

    A decode is a chunk of one new token (plus its drafts) after the request's prompt; every other
    chunk counts as prefill (prompt chunks, and recomputes after a preemption).
    """

    num_steps: int = 0  # steps recorded (their tokens came back)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0  # one a decoding sequence a step, drafts included
    num_preemptions: int = 0

    def record(self, output) -> None:
        """Count a step that ran: ``output`` is its ``SchedulerOutput``."""
        self.num_steps += 1
        for chunk in output.chunks:
            after_prompt = chunk.start >= chunk.request.num_prompt_tokens
            if after_prompt and chunk.num_new_tokens == 1 + len(chunk.draft_token_ids):
                self.num_decode_tokens += chunk.num_new_tokens
            else:
                self.num_prefill_tokens += chunk.num_new_tokens
