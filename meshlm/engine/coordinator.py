"""Rank 0's loop: accept requests, schedule a step, have every rank run it, emit what it produced.

The Coordinator talks to the ranks through a StepDispatcher (``execute(plan)``, whose tokens come
back through an ``AsyncStepResult``): its own model runner when there is one rank, an MPI broadcast to all ranks otherwise. The
scheduler owns every sequence's state (tokens, stops, finishing); the coordinator groups the
``n`` sequences of a request and turns what changed in a step into ``RequestOutput`` deltas.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

from meshlm.config import EngineConfig
from meshlm.engine.beam_search import BeamSearch, beam_sequence_params
from meshlm.engine.dispatch import StepDispatcher
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.outputs import RequestOutput
from meshlm.engine.plan_builder import BlockTableRows, build_step_plan
from meshlm.engine.request import Request
from meshlm.engine.scheduler import Scheduler, SchedulerOutput, SchedulerStats, SpecDecodeStats
from meshlm.engine.spec_scheduling import Proposer
from meshlm.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from meshlm.executor.async_output import AsyncStepResult
from meshlm.protocol import NewRequest, StepPlan
from meshlm.sampling_params import SamplingParams


@dataclass(slots=True, eq=False)
class _Group:
    """A user request: ``n`` sequences sampled from one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    is_prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        sequences = self.sequences
        if len(sequences) == 1:
            return sequences[0].status.is_finished
        return all(s.status.is_finished for s in sequences)

    def take_output(self) -> RequestOutput | None:
        """The delta of every sequence that progressed since the last call; None if none did."""
        sequences = self.sequences
        if len(sequences) == 1:  # n = 1, most requests
            delta = sequences[0].take_output()
            if delta is None:
                return None
            deltas, num_cached = [delta], sequences[0].num_cached_prompt_tokens
        else:
            deltas = [d for d in (s.take_output() for s in sequences) if d is not None]
            if not deltas:
                return None
            num_cached = min(s.num_cached_prompt_tokens for s in sequences)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, deltas, self.finished,
                             num_cached, self._take_prompt_logprobs())

    def _take_prompt_logprobs(self) -> list[dict[int, float] | None] | None:
        """The prompt's logprobs once they are complete (the first sample scores them), then None."""
        scores = self.sequences[0].prompt_logprobs
        if self.is_prompt_logprobs_sent or scores is None or len(scores) < len(self.prompt_token_ids):
            return None
        self.is_prompt_logprobs_sent = True
        return scores


@dataclass(slots=True, eq=False)
class _LaunchedStep:
    """A step every rank has started; its tokens reach rank 0 through ``pending``."""

    sched: SchedulerOutput
    sample_request_ids: list[str]  # the requests of the sampled rows, in row order
    pending: AsyncStepResult | None  # None when the step samples nothing


class Coordinator:
    """Rank 0's engine core; implements ``meshlm.engine.interface.EngineCore``."""

    def __init__(self, dispatcher: StepDispatcher, config: EngineConfig, tokenizer: Tokenizer | None,
                 num_blocks: int, eos_token_ids: Sequence[int], proposer: Proposer | None = None):
        """``proposer``: the drafts of speculative decoding (``make_proposer``); None decodes without."""
        self.dispatcher = dispatcher
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.vocab_size = config.model.vocab_size
        self.max_batch_size = config.scheduler.max_batch_size
        self.max_num_tokens = config.scheduler.max_num_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_size = config.cache.block_size
        self.kv = KVCacheManager(num_blocks, self.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, proposer)
        self._groups: dict[str, _Group | BeamSearch] = {}
        self._group_of: dict[str, _Group | BeamSearch] = {}  # sequence id -> its group
        # The sequences the workers know, each with its slot (StepPlan.seq_slots); freed slots are reused.
        self._slot_of: dict[str, int] = {}
        self._free_slots: list[int] = []
        self._table_rows = BlockTableRows()  # their block tables, kept between steps
        self._finished_ids: list[str] = []
        # The overlapped loop (config.async_scheduling): the launched step whose tokens are not recorded yet.
        self.async_scheduling = config.async_scheduling
        self._in_flight: _LaunchedStep | None = None
        self._beam_searches: dict[str, BeamSearch] = {}  # unfinished ones; while any is, steps are synchronous
        self._request_counter = itertools.count()
        self._arrival_counter = itertools.count()

    # --- requests ------------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None, prompt_text: str | None = None) -> str:
        """Queue a request; returns its id. A bad prompt raises ValueError and changes nothing."""
        params = params or SamplingParams()
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("the tokenizer is off (skip_tokenizer_init): prompts must be token ids "
                             "and stop strings cannot be used")
        if self.tokenizer is None and params.structured_outputs is not None:
            raise ValueError("structured_outputs: the tokenizer is off (skip_tokenizer_init), and grammars "
                             "are compiled against it")
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        self._check_prompt(token_ids)
        self._check_token_ids(params)
        request_id = request_id or f"req-{next(self._request_counter)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.use_beam_search:
            return self._submit_beam_search(request_id, prompt_text, token_ids, params)
        group = _Group(request_id, prompt_text, token_ids,
                       [self._new_sequence(request_id, token_ids, params, i) for i in range(params.n)])
        # The n samples prefill the prompt once: the others fork from the first at its first token.
        group.sequences[0].forks = group.sequences[1:]
        self.scheduler.add(group.sequences[0])
        self._groups[request_id] = group
        for request in group.sequences:
            self._group_of[request.request_id] = group
        return request_id

    def _new_sequence(self, request_id: str, token_ids: list[int], params: SamplingParams, index: int) -> Request:
        seq_params = params if params.n == 1 else params.for_sample(index)
        if index > 0 and seq_params.prompt_logprobs is not None:  # the first sample scores the prompt
            seq_params = seq_params.replace(prompt_logprobs=None)
        detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(
            self.tokenizer, token_ids, seq_params.skip_special_tokens)
        return Request(request_id if params.n == 1 else f"{request_id}#{index}", list(token_ids), seq_params,
                       arrival_index=next(self._arrival_counter), index=index,
                       eos_token_ids=frozenset() if seq_params.ignore_eos else self.eos_token_ids,
                       max_model_len=self.max_model_len, detokenizer=detokenizer)

    def _submit_beam_search(self, request_id: str, prompt_text: str | None, token_ids: list[int],
                            params: SamplingParams) -> str:
        max_tokens = self.max_model_len - len(token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        search = BeamSearch(request_id, prompt_text, self._new_beam(request_id, token_ids, params), params,
                            self.eos_token_ids, max_tokens, self.tokenizer)
        self.scheduler.add(search.sequences[0])
        self._groups[request_id] = self._beam_searches[request_id] = search
        self._group_of[search.sequences[0].request_id] = search
        return request_id

    def _new_beam(self, request_id: str, token_ids: list[int], params: SamplingParams) -> Request:
        """A beam's sequence (no detokenizer: the search decodes its hypotheses at the end)."""
        beam = Request(f"{request_id}#beam{next(self._request_counter)}", list(token_ids),
                       beam_sequence_params(params), arrival_index=next(self._arrival_counter),
                       max_model_len=self.max_model_len, is_beam=True)
        if request_id in self._groups:  # a fork of a running search; the first beam is mapped by its caller
            self._group_of[beam.request_id] = self._groups[request_id]
        return beam

    def _advance_beams(self) -> list[BeamSearch]:
        """One step of every beam search whose beams all reported their candidates."""
        advanced = []
        for search in [s for s in self._beam_searches.values() if s.is_ready]:
            new_beam = functools.partial(self._new_beam, search.request_id, search.prompt_token_ids, search.params)
            for beam in search.advance(self.scheduler, new_beam):
                self._forget(beam)
            advanced.append(search)
            if search.finished:
                del self._beam_searches[search.request_id]
        return advanced

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but the model's context length "
                             f"(max_model_len) is {self.max_model_len}; at most {self.max_model_len - 1} "
                             f"prompt tokens leave room for one generated token")
        vocab = self.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Token ids in the sampling parameters must be in the vocabulary (as vLLM refuses them)."""
        vocab = self.vocab_size
        for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("bad_words_token_ids", [t for word in params.bad_words_token_ids for t in word])):
            bad = sorted({t for t in ids if t >= vocab})
            if bad:
                raise ValueError(f"{name}: token ids {bad[:5]} are outside the vocabulary: the model has "
                                 f"vocab_size={vocab} (ids 0 to {vocab - 1})")

    def abort(self, request_id: str) -> bool:
        """Abort a request and free its KV blocks; False if it is unknown or already finished."""
        group = self._groups.pop(request_id, None)
        self._beam_searches.pop(request_id, None)
        if group is None:
            return False
        for request in group.sequences:
            if not request.is_finished:
                self.scheduler.abort(request.request_id)
            self._forget(request)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def has_pending_notices(self) -> bool:
        """Finished requests the other ranks have not heard of yet (sent with the next step)."""
        return bool(self._finished_ids)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's counts since the start (None when it is off)."""
        return None if self.scheduler.proposer is None else self.scheduler.spec_stats

    @property
    def scheduler_stats(self) -> SchedulerStats:
        """Steps run since the start, their prefill and decode tokens, preemptions."""
        return self.scheduler.stats

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes (a benchmark's warm-up should not help its measurement)."""
        self.kv.reset_prefix_cache()

    # --- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch one step; returns the deltas of the requests that progressed.

        The plain loop waits for the step's tokens before it returns. The overlapped loop
        (``async_scheduling``) returns once the step is launched and the step before it is
        recorded: the host plans step n+1 and records step n's tokens while the device runs, and
        the tokens of step n feed step n+1 on the device (``StepPlan.prev_token_rows``).
        """
        # Beam search picks each beam's next token on the host, so while one runs the steps do not
        # overlap: the step in flight lands before the next is planned.
        overlap = self.async_scheduling and not self._beam_searches
        progressed = []
        if not overlap and self._in_flight is not None:
            progressed += self._record(self._in_flight)
            self._in_flight = None
        progressed += self._advance_beams()
        sched = self.scheduler.schedule()  # counts the tokens of the step in flight as placeholders
        progressed += [self._group_of[r.request_id] for r in sched.finished]  # outgrew the KV pool
        to_record = self._launch(sched)
        if overlap:  # record the step before, which waits for its one copy to the host
            to_record, self._in_flight = self._in_flight, to_record
        if to_record is not None:
            progressed += self._record(to_record)
        progressed += self._advance_beams()
        return self._take_outputs(progressed)

    def _launch(self, sched: SchedulerOutput) -> _LaunchedStep | None:
        """Have every rank start the step; None when it runs no forward."""
        if sched.is_empty:
            if self._finished_ids:
                self.dispatcher.execute(StepPlan.empty(finished_request_ids=self._take_finished()))
            return None
        in_flight = self._in_flight
        prev_rows = {} if in_flight is None else dict(zip(in_flight.sample_request_ids, itertools.count()))
        new_requests = self._new_to_workers(sched)
        slots = [self._slot_of[chunk.request.request_id] for chunk in sched.chunks]
        plan = build_step_plan(sched.chunks, self.block_size, prev_rows, new_requests, self._take_finished(),
                               sched.block_copies, slots, self._table_rows)
        return _LaunchedStep(sched, plan.sample_request_ids, self.dispatcher.execute(plan))

    def _record(self, step: _LaunchedStep) -> list[_Group]:
        """Append a launched step's tokens; the groups of the requests that got one."""
        result = None if step.pending is None else step.pending.get_result()
        return [self._group_of[r.request_id] for r in self.scheduler.update_from_output(step.sched, result)]

    def _take_outputs(self, progressed: list[_Group]) -> list[RequestOutput]:
        outputs = []
        for group in dict.fromkeys(progressed):  # each group once, in order
            output = group.take_output()
            if output is not None:
                outputs.append(output)
            for request in group.sequences:
                if request.status.is_finished:
                    self._forget(request)
            if group.finished:
                self._groups.pop(group.request_id, None)
        return outputs

    def _forget(self, request: Request) -> None:
        """A finished sequence: the workers drop its sampling state with the next step."""
        self._group_of.pop(request.request_id, None)
        slot = self._slot_of.pop(request.request_id, None)
        if slot is not None:
            self._free_slots.append(slot)
            self._finished_ids.append(request.request_id)

    def _take_finished(self) -> list[str]:
        ids, self._finished_ids = self._finished_ids, []
        return ids

    def _new_to_workers(self, sched: SchedulerOutput) -> list[NewRequest]:
        new_requests, slot_of = [], self._slot_of
        for chunk in sched.chunks:
            for request in (chunk.request, *chunk.forked):
                if request.request_id not in slot_of:
                    slot_of[request.request_id] = self._free_slots.pop() if self._free_slots else len(slot_of)
                    new_requests.append(NewRequest(request.request_id, request.params, list(request.prompt_token_ids)))
        return new_requests

    def shutdown(self) -> None:
        self.dispatcher.shutdown()
