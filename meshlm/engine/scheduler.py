"""In-flight batching on rank 0: which requests run in the next step, and how many tokens each.

Each step has a budget of ``max_num_tokens`` tokens and ``max_batch_size`` sequences.

1. Running requests first, oldest first. Each gets ``min(uncomputed tokens, budget left)`` tokens:
   one for a decode, a chunk for a prompt still being prefilled. When its KV blocks cannot be
   allocated, the newest running request is preempted by recompute (its blocks are freed, it goes
   back to the front of the waiting queue and later recomputes its prompt and outputs so far); if
   the request itself is the newest, it is the one preempted.
2. Then, if nothing was preempted in this step, waiting requests in FIFO order: the prefix cache
   is applied (not to a request with prompt positions still to score for ``prompt_logprobs``:
   a cached position has no logits), the request gets ``min(uncomputed tokens, budget left)`` tokens (a long prompt is
   prefilled in chunks over several steps) and is admitted only if its blocks can be allocated
   (capacity policy ``max_utilization``, the default, as vLLM). Admission stops at the first
   request that does not fit: nobody skips ahead. Under the ``guaranteed_no_evict`` policy a
   request also waits until the pool holds, beyond what the running requests may still need to
   reach their ``max_tokens`` (or the context length), everything it may need itself (prefix-cache
   hits not counted): then no request is preempted while the running ones grow, at the price of
   fewer admitted while the pool is full of reservations. A request is admitted whatever it needs
   when nothing else runs.

Forks: the ``n`` samples of one prompt are one request in the queue, whose ``forks`` are the
other samples. The chunk that samples its first token forks them (``ScheduledChunk.forked``):
each takes the request's block table (shared, copy-on-write in the KV manager) and samples its own
first token from the same logits row; from the next step on they run as requests of their own.

Scheduling a chunk advances its request's ``num_computed_tokens`` at once, and a chunk that
samples adds an output placeholder; ``update_from_output`` later appends the sampled token in its
place. So the next step can be scheduled while this one still runs on the device (the overlapped
loop): a decode of a token still in flight reads it from the device, and a request whose tokens in
flight already reach its length limit is not scheduled again. A stop found one step late leaves
one extra token computed for a finished request, which ``update_from_output`` drops.

"Arrival" is the order of ``add``. The running list stays in arrival order: a request is admitted
only after every older one, and preemption always takes the newest, which is older than every
waiting request, so it goes to the front of the queue.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshlm.config import SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager, num_blocks_for
from meshlm.engine.fork_scheduling import ForkScheduling
from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.scheduler_stats import SchedulerStats
from meshlm.engine.spec_scheduling import Proposer, SpecDecodeStats, SpeculativeScheduling, prompt_logprobs
from meshlm.protocol import StepResult

__all__ = ["Scheduler", "ScheduledChunk", "SchedulerOutput", "SchedulerStats", "SpecDecodeStats"]


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens ``start : start + num_new_tokens`` of one request's sequence, run this step. The
    last of them may be a placeholder: the token the step in flight samples for it."""

    request: Request
    start: int  # the request's num_computed_tokens when the chunk was scheduled
    num_new_tokens: int
    is_sampling: bool  # the chunk reaches the last token (placeholders included): a token is sampled
    # Positions first_scored : first_scored + num_scored score the prompt token after each (prompt_logprobs).
    first_scored: int = 0
    num_scored: int = 0
    # Sequences forked from ``request`` by this chunk: each samples its own token from the same
    # last-token logits, in the rows after the request's own.
    forked: Sequence[Request] = ()
    # Speculative decoding: the chunk's last tokens are these drafts, after the last known token.
    draft_token_ids: Sequence[int] = ()


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan, before it is turned into arrays for the ranks."""

    chunks: list[ScheduledChunk]  # running requests first (in their order), then newly admitted
    preempted: list[Request]  # preempted this step; already back in the waiting queue
    num_tokens: int  # sum of the chunks' num_new_tokens
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) pairs
    # Finished by the scheduler itself (status FINISHED_LENGTH, blocks freed): their tokens
    # outgrew the whole KV pool. The caller reports them to their clients.
    finished: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler(SpeculativeScheduling, ForkScheduling):
    """Owns the waiting queue and the running set; decides each step's chunks.

    With a ``proposer`` (speculative decoding) a decode of a request whose last token is known
    also runs the proposer's draft tokens: its chunk is ``1 + num_drafts`` tokens and samples at
    each. ``update_from_output`` appends the accepted drafts and the sampled token, and rolls the
    request's computed tokens and blocks back past the rejected drafts.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, proposer: Proposer | None = None) -> None:
        if config.max_num_tokens is None:
            raise ValueError("max_num_tokens=None: the runtime resolves it for the card before scheduling "
                             "(meshlm.config.auto_max_num_tokens)")
        self.config = config
        self.kv = kv
        self.proposer = proposer
        self.spec_stats = SpecDecodeStats()
        self.stats = SchedulerStats()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # arrival order; finished ones removed at the next step
        self._num_finished_running = 0
        self._requests: dict[str, Request] = {}  # every unfinished request

    # ---- queries -----------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running) - self._num_finished_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> tuple[Request, ...]:
        """The waiting queue, front first (the order admission takes)."""
        return tuple(self._waiting)

    # ---- requests in and out -----------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request.

        Raises ``ValueError`` when the request could never run: an empty prompt, or a prompt that
        with one generated token does not fit in the whole KV pool (a prompt of exactly the pool's
        size could be prefilled, but its first token could never be decoded). A request whose
        generation later outgrows the pool is finished with ``FINISHED_LENGTH`` when it does; the
        caller caps ``max_tokens`` beforehand when it wants to refuse such requests instead.
        """
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already queued or running")
        if request.num_prompt_tokens < 1:
            raise ValueError(f"request {request.request_id!r}: the prompt is empty; at least one token is needed")
        for r in (request, *request.forks):
            if r.num_computed_tokens or r.block_ids or r.output_token_ids or r.request_id in self._requests:
                raise ValueError(f"request {r.request_id!r} is not fresh: num_computed_tokens="
                                 f"{r.num_computed_tokens}, {len(r.block_ids)} blocks, "
                                 f"{len(r.output_token_ids)} outputs, or its id is in use")
        bs, num_blocks = self.kv.block_size, self.kv.num_blocks
        needed = num_blocks_for(request.num_prompt_tokens + 1, bs)
        if needed > num_blocks:
            raise ValueError(
                f"request {request.request_id!r}: prompt of {request.num_prompt_tokens} tokens plus one "
                f"generated token needs {needed} KV blocks of {bs} tokens, but the pool has only "
                f"{num_blocks} blocks ({num_blocks * bs} tokens)")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop an unfinished request (status ``FINISHED_ABORTED``, blocks freed); None if unknown."""
        request = self._requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark an unfinished request finished with ``status``, free its blocks, forget it."""
        if not status.is_finished:
            raise ValueError(f"finish() needs a finished status, got {status}")
        if self._requests.get(request.request_id) is not request:
            raise ValueError(f"request {request.request_id!r} is not an unfinished request of this scheduler")
        del self._requests[request.request_id]
        if request.status == RequestStatus.WAITING:
            self._waiting.remove(request)  # rare (an abort before admission): O(queue) is fine
        else:
            self._num_finished_running += 1  # dropped from the running list at the next schedule()
        request.status = status
        self.kv.free(request)
        self._finish_forks(request, status)

    def _finish_forks(self, request: Request, status: RequestStatus) -> None:
        """Samples not forked yet end with their parent (they hold no blocks)."""
        for child in request.forks:
            child.status = status
        request.forks = []

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks; allocates their blocks. Call ``update_from_output`` after running."""
        self._drop_finished_running()
        out = SchedulerOutput(chunks=[], preempted=[], num_tokens=0)
        budget = self._schedule_running(out, self.config.max_num_tokens)
        if not out.preempted:  # blocks are short: admitting now would only preempt again
            self._schedule_waiting(out, budget)
        out.num_tokens = sum(chunk.num_new_tokens for chunk in out.chunks)
        for chunk in out.chunks:
            if chunk.forked:  # run from the next step on, right after their parent
                at = self._running.index(chunk.request) + 1
                self._running[at:at] = chunk.forked
        out.block_copies = self.kv.take_block_copies()
        self.stats.num_preemptions += len(out.preempted)
        return out

    def update_from_output(self, output: SchedulerOutput, result: StepResult | None) -> list[Request]:
        """Record that the step ran: cache the chunks' full blocks, put each sampled token in its
        placeholder's place and finish the requests it ends (blocks freed).

        Returns the requests that got a token, finished or not. A request finished since the step
        was planned (an abort, or a stop found in the step before) has its token dropped; one
        preempted since keeps it (it was sampled from the whole sequence, which the recompute
        rebuilds).
        """
        self.stats.record(output)
        sampled = []
        row = 0  # the chunk's row in ``result``: sampling chunks in order
        prompt_row = 0  # its first row of prompt scores
        for chunk in output.chunks:
            request = chunk.request
            if chunk.num_scored and not request.is_finished:
                request.prompt_logprobs.extend(prompt_logprobs(result, prompt_row, chunk))
            prompt_row += chunk.num_scored
            if not chunk.is_sampling:
                if request.status == RequestStatus.RUNNING:
                    self.kv.cache_full_blocks(request)  # every token it has computed is known now
                continue
            for r in (request, *chunk.forked):
                if self._append(r, chunk, result, row):
                    sampled.append(r)
                row += 1
        return sampled

    def _append(self, request: Request, chunk: ScheduledChunk, result: StepResult, row: int) -> bool:
        """Put row ``row``'s tokens in ``request``'s placeholders (and finish it when a token ends
        it); False when the request finished before the tokens came."""
        if request.status.is_finished:
            return False
        num_drafts = len(chunk.draft_token_ids) if request is chunk.request else 0
        request.num_output_placeholders -= 1 + num_drafts
        if request.is_beam:  # the beam search appends the token it picks (extend_beam)
            k = request.params.logprobs
            request.beam_candidates = list(zip(result.top_token_ids[row, :k].tolist(),
                                               result.top_logprobs[row, :k].tolist()))
            if request.status == RequestStatus.RUNNING:
                self.kv.cache_full_blocks(request)
            return True
        status = self._append_tokens(request, num_drafts, result, row)
        if request.status == RequestStatus.RUNNING:
            self.kv.cache_full_blocks(request)  # every token it has computed is known now
        if status is not None:
            self.finish(request, status)
        return True

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        running, chunks, max_batch_size = self._running, out.chunks, self.config.max_batch_size
        pool_tokens = self.kv.num_blocks * self.kv.block_size
        index = 0
        # The sampler's memory is reserved for max_batch_size rows: drafts fill what decodes leave.
        draft_budget = max_batch_size - len(running)
        while index < len(running) and budget > 0 and len(chunks) < max_batch_size:
            request = running[index]
            num_known = request.num_tokens_with_placeholders
            if num_known > pool_tokens:  # its known tokens cannot all be in the pool at once
                running.pop(index)
                self._finish_for_length(request, out)
                continue
            num_new = min(num_known - request.num_computed_tokens, budget)
            if num_new == 0 or request.is_capped_by_placeholders:  # it finishes when they land
                index += 1
                continue
            drafts = self._draft_tokens(request, budget, draft_budget) if self.proposer is not None else []
            draft_budget -= len(drafts)
            # Drafts come only with a decode (num_new == 1) whose drafts' blocks were found free.
            while not self.kv.try_allocate(request, num_new + len(drafts)):
                victim = running.pop()  # the newest; never one scheduled earlier in this loop
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._add_chunk(request, num_new, out, drafts)
                budget -= num_new + len(drafts)
                index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        waiting, max_batch_size = self._waiting, self.config.max_batch_size
        num_drafts = sum(len(c.draft_token_ids) for c in out.chunks)  # their logits rows count too
        # Sequences running soon: the running ones and the forks still to come, which sample in the
        # step that forks them. A request and its forks are admitted only when all of them fit
        # (or nothing runs), so no step samples more rows than max_batch_size allows.
        num_seqs = len(self._running) + (
            sum(len(r.forks) for r in self._running) + sum(len(c.forked) for c in out.chunks) if waiting else 0)
        no_evict = self.config.capacity_scheduler_policy == "guaranteed_no_evict"
        reserved = self._blocks_to_finish_running() if no_evict and waiting else 0
        while (waiting and budget > 0 and len(out.chunks) + num_drafts < max_batch_size
               and num_seqs < max_batch_size):
            request = waiting[0]
            if self._outgrew_pool(request):
                waiting.popleft()
                self._finish_for_length(request, out)
                continue
            if num_seqs and num_seqs + 1 + len(request.forks) > max_batch_size:
                break
            if no_evict:
                reserved += self._blocks_to_finish(request)
                if num_seqs and reserved > self.kv.num_free_blocks:
                    break
            # A request preempted with a token in flight waits at least one step, which lands it.
            assert not request.num_output_placeholders, f"{request.request_id} admitted with tokens in flight"
            if not request.needs_prompt_logprobs:  # scoring the prompt needs every position run
                self.kv.get_computed_prefix(request)
            num_new = min(request.num_uncomputed_tokens, budget)
            if not self.kv.try_allocate(request, num_new):
                self.kv.free(request)  # give back the shared prefix blocks until it fits
                request.num_computed_tokens = 0
                break
            waiting.popleft()
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            num_seqs += 1 + len(request.forks)
            self._add_chunk(request, num_new, out)
            budget -= num_new

    def _add_chunk(self, request: Request, num_new: int, out: SchedulerOutput, drafts: list[int] = ()) -> None:
        """Schedule ``num_new`` of the request's tokens, then ``drafts`` (each may become an output,
        so each adds a placeholder); their blocks are allocated already."""
        start = request.num_computed_tokens
        is_sampling = start + num_new == request.num_tokens_with_placeholders
        if request.params.prompt_logprobs is None:
            first_scored, num_scored = start, 0
        else:
            first_scored, num_scored = request.positions_to_score(start, num_new)
        num_drafts = len(drafts)
        chunk = ScheduledChunk(request, start, num_new + num_drafts, is_sampling, first_scored, num_scored,
                               draft_token_ids=drafts)
        out.chunks.append(chunk)
        request.num_computed_tokens += num_new + num_drafts
        request.num_output_placeholders += is_sampling + num_drafts
        if is_sampling and request.forks:
            self._fork(chunk)

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Recompute preemption: free the blocks, restart from token 0, wait at the queue's front."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self._waiting.appendleft(request)
        out.preempted.append(request)

    def _blocks_to_finish(self, request: Request) -> int:
        """Blocks the request and its forks still to come may need beyond those they hold, to
        reach their most tokens (the whole pool when nothing bounds them)."""
        most = request.max_length
        full = self.kv.num_blocks if most is None else num_blocks_for(most, self.kv.block_size)
        return max(0, full - len(request.block_ids)) + full * len(request.forks)

    def _blocks_to_finish_running(self) -> int:
        return sum(self._blocks_to_finish(r) for r in self._running if not r.status.is_finished)

    def _outgrew_pool(self, request: Request) -> bool:
        """True when the request's known tokens cannot all be in the KV pool at once."""
        return request.num_tokens_with_placeholders > self.kv.num_blocks * self.kv.block_size

    def _finish_for_length(self, request: Request, out: SchedulerOutput) -> None:
        # Already taken out of its queue by the caller.
        del self._requests[request.request_id]
        request.status = RequestStatus.FINISHED_LENGTH
        self.kv.free(request)
        out.finished.append(request)
        out.finished.extend(request.forks)
        self._finish_forks(request, RequestStatus.FINISHED_LENGTH)

    def _drop_finished_running(self) -> None:
        if self._num_finished_running:
            self._running = [r for r in self._running if not r.status.is_finished]
            self._num_finished_running = 0

