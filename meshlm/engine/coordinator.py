"""Rank 0's loop: accept requests, schedule a step, have every rank run it, turn tokens into text.

The Coordinator talks to the ranks through an executor (``execute(plan) -> SamplerOutput``):
the local engine when there is one rank, an MPI broadcast to all ranks otherwise.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from meshlm.config import SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.outputs import RequestOutput, SequenceOutputState
from meshlm.protocol import NewRequest, StepPlan
from meshlm.engine.request import Request, RequestStatus
from meshlm.executor.sampler import SamplerOutput
from meshlm.sampling_params import SamplingParams
from meshlm.engine.scheduler import Scheduler, SchedulerOutput
from meshlm.engine.tokenizer import Tokenizer

log = logging.getLogger("meshlm")


class Executor(Protocol):
    def execute(self, plan: StepPlan) -> SamplerOutput | None: ...

    def shutdown(self) -> None: ...


@dataclass(slots=True, eq=False)
class _Group:
    """A user request: ``n`` sequences sampled from one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[SequenceOutputState]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [s.output() for s in self.sequences], self.finished,
                             min(s.request.num_cached_prompt_tokens for s in self.sequences))


class Coordinator:
    def __init__(self, executor: Executor, tokenizer: Tokenizer, scheduler_config: SchedulerConfig,
                 num_blocks: int, block_size: int, max_model_len: int, eos_token_ids: Sequence[int],
                 vocab_size: int, enable_prefix_caching: bool = True):
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.kv)
        self._groups: dict[str, _Group] = {}
        self._seq_state: dict[str, tuple[_Group, SequenceOutputState]] = {}
        self._known_to_workers: set[str] = set()
        self._finished_ids: list[str] = []
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
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            token_ids = [int(t) for t in prompt]
        self._check_prompt(token_ids)
        request_id = request_id or f"req-{next(self._request_counter)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        group = _Group(request_id, prompt_text, token_ids, [])
        requests = []
        for i in range(params.n):
            seq_params = params if params.n == 1 else params.for_sample(i)
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            request = Request(seq_id, list(token_ids), seq_params, arrival_index=next(self._arrival_counter))
            state = SequenceOutputState.create(request, i, self.tokenizer, self._stop_ids(seq_params),
                                               self.max_model_len)
            group.sequences.append(state)
            requests.append(request)
        for request in requests:
            self.scheduler.add(request)  # validated per request; the first one raises if any would
        self._groups[request_id] = group
        for state in group.sequences:
            self._seq_state[state.request.request_id] = (group, state)
        return request_id

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        return () if params.ignore_eos else self.eos_token_ids

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

    def abort(self, request_id: str) -> bool:
        """Abort a request and free its KV blocks; False if it is unknown or already finished."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        for state in group.sequences:
            if not state.finished:
                state.abort()
                self._retire(state)
        self._groups.pop(request_id, None)
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

    # --- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the outputs of the requests that progressed."""
        sched = self.scheduler.schedule()
        outgrown: dict[str, _Group] = {}
        for request in sched.finished:  # outgrew the whole KV pool: finished by the scheduler
            group, state = self._seq_state[request.request_id]
            state._finish(RequestStatus.FINISHED_LENGTH, None)
            self._retire(state, already_finished=True)
            outgrown[group.request_id] = group
        if sched.is_empty:
            if self._finished_ids:
                self.executor.execute(StepPlan.empty(finished_request_ids=self._take_finished()))
            return [g.output() for g in outgrown.values()]
        plan = self._build_plan(sched)
        result = self.executor.execute(plan)
        self.scheduler.update_after_step(sched)
        outputs = self._process(sched, result)
        reported = {o.request_id for o in outputs}
        return outputs + [g.output() for rid, g in outgrown.items() if rid not in reported]

    def _take_finished(self) -> list[str]:
        ids, self._finished_ids = self._finished_ids, []
        return ids

    def _build_plan(self, sched: SchedulerOutput) -> StepPlan:
        chunks = sched.chunks
        bs = self.block_size
        query_lens = np.array([c.num_new_tokens for c in chunks], dtype=np.int32)
        starts = np.array([c.request.num_computed_tokens for c in chunks], dtype=np.int64)
        query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        # Positions: each chunk's range start..start+len, packed.
        seq_index = np.repeat(np.arange(len(chunks)), query_lens)  # [num_tokens]
        positions = starts[seq_index] + (np.arange(query_start_loc[-1]) - query_start_loc[:-1][seq_index])
        input_ids = np.fromiter(
            itertools.chain.from_iterable(
                c.request.all_token_ids[c.request.num_computed_tokens:c.request.num_computed_tokens + c.num_new_tokens]
                for c in chunks), dtype=np.int64, count=int(query_start_loc[-1]))
        max_blocks = max(len(c.request.block_ids) for c in chunks)
        block_tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)
        for i, c in enumerate(chunks):
            block_tables[i, :len(c.request.block_ids)] = c.request.block_ids
        slot_mapping = block_tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        sample_rows = np.array([i for i, c in enumerate(chunks) if c.is_sampling], dtype=np.int64)
        new_requests = []
        for c in chunks:
            rid = c.request.request_id
            if rid not in self._known_to_workers:
                self._known_to_workers.add(rid)
                new_requests.append(NewRequest(rid, c.request.params, list(c.request.prompt_token_ids)))
        return StepPlan(
            input_ids=input_ids, positions=positions.astype(np.int64), slot_mapping=slot_mapping,
            query_start_loc=query_start_loc, seq_lens=(starts + query_lens).astype(np.int32),
            block_tables=block_tables, sample_rows=sample_rows,
            sample_request_ids=[chunks[i].request.request_id for i in sample_rows],
            new_requests=new_requests, finished_request_ids=self._take_finished())

    def _process(self, sched: SchedulerOutput, result: SamplerOutput | None) -> list[RequestOutput]:
        progressed: dict[str, _Group] = {}
        sampled = [c for c in sched.chunks if c.is_sampling]
        now = time.monotonic()
        for row, chunk in enumerate(sampled):
            group, state = self._seq_state[chunk.request.request_id]
            if state.finished:  # aborted while the step ran
                continue
            top = None
            if result.top_token_ids is not None and state.request.params.logprobs:
                k = state.request.params.logprobs
                top = dict(zip(result.top_token_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist()))
            logprob = float(result.logprobs[row]) if result.logprobs is not None else None
            state.append(int(result.token_ids[row]), logprob, top)
            if group.first_token_time is None:
                group.first_token_time = now
            progressed[group.request_id] = group
            if state.finished:
                self._retire(state, already_finished=False)
        return [g.output() for g in progressed.values()]

    def _retire(self, state: SequenceOutputState, already_finished: bool = False) -> None:
        """A sequence is done: free its blocks, tell the workers, drop the group once all are done."""
        request = state.request
        if not already_finished:
            self.scheduler.finish(request, state.status)
        if request.request_id in self._known_to_workers:
            self._known_to_workers.discard(request.request_id)
            self._finished_ids.append(request.request_id)
        group, _ = self._seq_state.pop(request.request_id)
        if group.finished:
            self._groups.pop(group.request_id, None)

    def shutdown(self) -> None:
        self.executor.shutdown()
