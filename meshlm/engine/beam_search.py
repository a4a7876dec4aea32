"""Beam search on rank 0: which beams live on, which finish, and when the search ends.

The beams are ordinary sequences of the scheduler (``Request.is_beam``) sampled greedily with the
top ``2 x beam_width`` logprobs: the engine runs their forwards batched with everything else, and
each step they report candidates, (token, logprob) pairs of the model's raw log-softmax. Once every
live beam has its candidates, ``BeamSearch.advance`` makes one step of transformers' beam search:

1. The ``2 x beam_width`` best continuations over all beams by cumulative logprob (the first step
   has one beam, the prompt's).
2. A continuation ending in an eos id (unless ``ignore_eos``) or reaching ``max_tokens`` is a
   finished hypothesis, scored ``cum_logprob / num_generated_tokens ** length_penalty`` (the eos
   counts), when it ranks among the first ``beam_width``; the ``beam_width`` best hypotheses are
   kept (transformers' BeamHypotheses).
3. The first ``beam_width`` continuations that did not finish are the next beams. A beam that
   continues into ``k`` of them goes on with the first and is forked ``k - 1`` times (the KV
   blocks shared copy-on-write); a beam that continues into none is dropped and frees its blocks.

``early_stopping`` decides when the search ends once ``beam_width`` hypotheses are kept, as in
transformers: ``True`` ends it at once; ``False`` ends it when the best live beam, scored at the
current length, cannot beat the worst hypothesis; ``"never"`` does the same but, with a positive
``length_penalty``, scores the live beam at ``max_tokens`` (the best it could reach). The search
also ends when every continuation finished (``max_tokens``). The output is the ``n`` best
hypotheses, best first.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshlm.engine.outputs import CompletionOutput, RequestOutput
from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.scheduler import Scheduler
from meshlm.engine.tokenizer import Tokenizer
from meshlm.sampling_params import SamplingParams

__all__ = ["BeamSearch", "beam_sequence_params"]


def beam_sequence_params(params: SamplingParams) -> SamplingParams:
    """What every beam's sequence samples with: greedy, with the top 2 x width logprobs."""
    return SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True, logprobs=2 * params.beam_width)


@dataclass(slots=True)
class _Hypothesis:
    token_ids: list[int]
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (eos) or "length"


class BeamSearch:
    """One request's beam search: its live beams (``sequences``) and its finished hypotheses."""

    def __init__(self, request_id: str, prompt: str | None, first_beam: Request, params: SamplingParams,
                 eos_token_ids: frozenset[int], max_tokens: int, tokenizer: Tokenizer | None):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.width = params.beam_width
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.prompt_token_ids = first_beam.prompt_token_ids
        self.sequences = [first_beam]  # the live beams, best first
        self._cum_logprobs = {first_beam.request_id: 0.0}
        self._hypotheses: list[_Hypothesis] = []  # best first, at most width
        self._improvable = True  # transformers' early-stop heuristic; False ends the search
        self.finished = False
        self._is_output_taken = False

    @property
    def is_ready(self) -> bool:
        """Every live beam has reported its candidates (or was ended by the scheduler: its
        tokens outgrew the KV pool): the search can take a step."""
        return not self.finished and all(b.beam_candidates is not None or b.is_finished for b in self.sequences)

    def advance(self, scheduler: Scheduler, new_beam: Callable[[], Request]) -> list[Request]:
        """One step (see the module docstring); returns the beams it ended (finished and freed)."""
        self.sequences = [b for b in self.sequences if not b.is_finished]
        if not self.sequences:  # the scheduler ended them all
            self.finished = True
            return []
        candidates = sorted(((self._cum_logprobs[b.request_id] + lp, i, t) for i, b in enumerate(self.sequences)
                             for t, lp in b.beam_candidates), key=lambda c: -c[0])[:2 * self.width]
        num_generated = len(self.sequences[0].output_token_ids) + 1
        at_length = num_generated >= self.max_tokens
        live: list[tuple[float, int, int]] = []
        for rank, (cum, i, token) in enumerate(candidates):
            if token in self.eos_token_ids or at_length:
                if rank < self.width:  # (a search that could no longer improve has ended already)
                    self._add_hypothesis(self.sequences[i].output_token_ids + [token], cum, num_generated,
                                         "length" if token not in self.eos_token_ids else "stop")
            elif len(live) < self.width:
                live.append((cum, i, token))
        self._update_improvable(live, num_generated)
        self.finished = not live or not self._improvable or (self.params.early_stopping is True and self._is_full)
        return self._continue(scheduler, [] if self.finished else live, new_beam)

    @property
    def _is_full(self) -> bool:
        return len(self._hypotheses) == self.width

    def _add_hypothesis(self, token_ids: list[int], cum: float, num_generated: int, reason: str) -> None:
        score = cum / num_generated ** self.params.length_penalty
        self._hypotheses.append(_Hypothesis(token_ids, cum, score, reason))
        self._hypotheses.sort(key=lambda h: -h.score)  # stable: an equal score keeps the older first
        del self._hypotheses[self.width:]

    def _update_improvable(self, live: list[tuple[float, int, int]], num_generated: int) -> None:
        """Whether the best live beam may still beat the worst kept hypothesis (transformers'
        heuristic, per ``early_stopping``); only once ``width`` hypotheses are kept."""
        if not self._is_full or not live:
            return
        length = num_generated
        if self.params.early_stopping == "never" and self.params.length_penalty > 0.0:
            length = self.max_tokens
        best_live = live[0][0] / length ** self.params.length_penalty
        self._improvable = best_live > self._hypotheses[-1].score

    def _continue(self, scheduler: Scheduler, live: list[tuple[float, int, int]],
                  new_beam: Callable[[], Request]) -> list[Request]:
        """Fork and extend the beams that continue, drop the others; ``live`` is best first."""
        parents = self.sequences
        children: dict[int, list[tuple[float, int]]] = {}
        for cum, i, token in live:
            children.setdefault(i, []).append((cum, token))
        next_beams: list[tuple[float, Request]] = []
        for i, kids in children.items():  # forks first: they copy the parent's tokens before it grows
            for cum, token in kids[1:]:
                child = new_beam()
                scheduler.extend_beam(parents[i], token, child)
                next_beams.append((cum, child))
        for i, kids in children.items():
            scheduler.extend_beam(parents[i], kids[0][1])
            next_beams.append((kids[0][0], parents[i]))
        dropped = [b for i, b in enumerate(parents) if i not in children]
        for beam in dropped:
            scheduler.finish(beam, RequestStatus.FINISHED_ABORTED)
        next_beams.sort(key=lambda cb: -cb[0])
        self.sequences = [b for _, b in next_beams]
        self._cum_logprobs = {b.request_id: cum for cum, b in next_beams}
        return dropped

    def take_output(self) -> RequestOutput | None:
        """The ``n`` best hypotheses once the search has finished (once); None before."""
        if not self.finished or self._is_output_taken:
            return None
        self._is_output_taken = True
        outputs = []
        for index, h in enumerate(self._hypotheses[:self.params.n]):
            text_ids = h.token_ids[:-1] if h.finish_reason == "stop" else h.token_ids
            text = "" if self.tokenizer is None else self.tokenizer.decode(
                text_ids, skip_special_tokens=self.params.skip_special_tokens)
            outputs.append(CompletionOutput(index, text, list(h.token_ids), h.finish_reason, None, None,
                                            h.cum_logprob))
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, True, 0)
