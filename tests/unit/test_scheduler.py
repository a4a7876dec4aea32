"""The in-flight batching scheduler: budgets, chunked prefill, FIFO admission, preemption, aborts."""
from __future__ import annotations

import random

import numpy as np
import pytest

from meshlm.config import SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.request import Request, RequestStatus
from meshlm.sampling_params import SamplingParams
from meshlm.engine.scheduler import Scheduler, SchedulerOutput
from meshlm.protocol import StepResult


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_tokens: int = 64,
                   max_batch_size: int = 8, prefix_caching: bool = True,
                   policy: str = "max_utilization") -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    config = SchedulerConfig(max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                             capacity_scheduler_policy=policy)
    return Scheduler(config, kv)


def make_request(request_id: str, num_prompt: int, max_tokens: int | None = 4, first: int = 0) -> Request:
    tokens = [first + i for i in range(num_prompt)]
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens))


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step: schedule, 'run', sample a token for sampling chunks, stop at max_tokens."""
    out = sched.schedule()
    sched.update_from_output(out, sampled([1000 + c.request.num_tokens for c in out.chunks if c.is_sampling]))
    return out


def sampled(token_ids: list[int]) -> StepResult:
    return StepResult(np.array(token_ids, dtype=np.int64), None, None, None)


def plan(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(c.request.request_id, c.num_new_tokens, c.is_sampling) for c in out.chunks]


# ---- budgets and order -------------------------------------------------------------------------

def test_token_budget_and_batch_size():
    sched = make_scheduler(max_num_tokens=10, max_batch_size=3)
    for i in range(5):
        sched.add(make_request(f"r{i}", 4, first=10 * i))
    out = step(sched)
    # 4 + 4 + the first 2 of r2's 4 tokens: budget 10; r3 would be a 4th sequence anyway.
    assert plan(out) == [("r0", 4, True), ("r1", 4, True), ("r2", 2, False)]
    assert out.num_tokens == 10
    out = step(sched)
    # decodes, then r2's last 2; the running set is at max_batch_size, so nobody is admitted.
    assert plan(out) == [("r0", 1, True), ("r1", 1, True), ("r2", 2, True)]
    assert out.num_tokens == 4
    assert sched.num_running == 3 and sched.num_waiting == 2


def test_running_decodes_come_before_new_prefills():
    sched = make_scheduler(max_num_tokens=64)
    sched.add(make_request("old", 5))
    step(sched)
    new = make_request("new", 7, first=50)
    sched.add(new)
    out = step(sched)
    assert plan(out) == [("old", 1, True), ("new", 7, True)]
    assert new.status == RequestStatus.RUNNING


def test_chunked_prefill_samples_only_on_the_last_chunk():
    sched = make_scheduler(max_num_tokens=8)
    req = make_request("long", 20, max_tokens=2)
    sched.add(req)
    assert plan(step(sched)) == [("long", 8, False)]
    assert req.num_computed_tokens == 8 and req.output_token_ids == []
    assert plan(step(sched)) == [("long", 8, False)]
    assert plan(step(sched)) == [("long", 4, True)]
    assert req.num_computed_tokens == 20 and len(req.output_token_ids) == 1
    assert plan(step(sched)) == [("long", 1, True)]
    assert req.status == RequestStatus.FINISHED_LENGTH and not sched.has_unfinished


def test_chunk_shares_the_budget_with_decodes():
    sched = make_scheduler(max_num_tokens=6)
    sched.add(make_request("a", 3, max_tokens=10))
    step(sched)
    sched.add(make_request("b", 12, first=40))
    assert plan(step(sched)) == [("a", 1, True), ("b", 5, False)]
    assert plan(step(sched)) == [("a", 1, True), ("b", 5, False)]
    assert plan(step(sched)) == [("a", 1, True), ("b", 2, True)]


def test_admission_is_fifo_without_skipping():
    # 4 blocks of 4: r0 takes 3; r1 needs 2 and does not fit; r2 would fit in 1 but must wait.
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_tokens=100)
    sched.add(make_request("r0", 10, max_tokens=2))
    sched.add(make_request("r1", 8, first=100))
    r2 = make_request("r2", 2, first=200)
    sched.add(r2)
    out = step(sched)
    assert plan(out) == [("r0", 10, True)]
    assert sched.num_waiting == 2
    assert r2.status == RequestStatus.WAITING and r2.block_ids == []
    out = step(sched)  # r0's decode, then r0 finishes: 3 blocks come back
    assert plan(out) == [("r0", 1, True)]
    out = step(sched)
    assert plan(out) == [("r1", 8, True), ("r2", 2, True)]


# ---- preemption --------------------------------------------------------------------------------

def test_preemption_picks_the_newest_and_it_resumes():
    # 4 blocks of 4, no prefix cache so recompute is visible in the token counts.
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_tokens=100, prefix_caching=False)
    r0, r1 = make_request("r0", 7, max_tokens=3), make_request("r1", 7, max_tokens=4, first=50)
    sched.add(r0)
    sched.add(r1)
    assert plan(step(sched)) == [("r0", 7, True), ("r1", 7, True)]  # 2 blocks each, pool full
    assert plan(step(sched)) == [("r0", 1, True), ("r1", 1, True)]  # token 8 still in block 2
    out = step(sched)  # token 9 of r0 needs a 3rd block: r1 (newest) is preempted
    assert plan(out) == [("r0", 1, True)]
    assert out.preempted == [r1]
    assert r1.status == RequestStatus.WAITING and r1.num_computed_tokens == 0
    assert r1.block_ids == [] and r1.num_preemptions == 1
    assert r1.output_token_ids and len(r1.output_token_ids) == 2
    assert r0.status == RequestStatus.FINISHED_LENGTH  # 3 tokens
    assert sched.num_waiting == 1 and sched.num_running == 0
    out = step(sched)  # r1 recomputes prompt 7 + 2 outputs in one chunk
    assert plan(out) == [("r1", 9, True)]
    assert plan(step(sched)) == [("r1", 1, True)]
    assert r1.status == RequestStatus.FINISHED_LENGTH and len(r1.output_token_ids) == 4
    assert sched.kv.num_free_blocks == 4 and not sched.has_unfinished


def test_the_newest_preempts_itself():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_tokens=100, prefix_caching=False)
    r0, r1 = make_request("r0", 6, max_tokens=8), make_request("r1", 8, max_tokens=8, first=50)
    sched.add(r0)
    sched.add(r1)
    step(sched)
    out = step(sched)  # r0: 7 tokens fit in its 2 blocks; r1: token 9 needs a 3rd, r1 is newest
    assert plan(out) == [("r0", 1, True)]
    assert out.preempted == [r1]
    assert r0.num_preemptions == 0 and len(r0.block_ids) == 2


def test_preempted_requests_wait_in_arrival_order_before_new_ones():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_tokens=100, prefix_caching=False)
    reqs = [make_request(f"r{i}", 8, max_tokens=3, first=100 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    assert plan(step(sched)) == [("r0", 8, True), ("r1", 8, True), ("r2", 8, True)]
    sched.add(make_request("late", 1, first=900))
    # Every request needs a 3rd block for token 9 and none is free: r0 preempts r2 and takes a
    # freed block; r1 takes the other one.
    out = step(sched)
    assert plan(out) == [("r0", 1, True), ("r1", 1, True)]
    assert out.preempted == [reqs[2]]
    # r2 is back at the front, ahead of "late"; no admission in a step that preempted.
    assert [r.request_id for r in sched.waiting] == ["r2", "late"]


def test_no_admission_in_a_step_that_preempted():
    # 3 blocks of 4, 4 tokens a step, no prefix cache.
    sched = make_scheduler(num_blocks=3, block_size=4, max_num_tokens=4, prefix_caching=False)
    r0, r1 = make_request("r0", 4, max_tokens=20), make_request("r1", 4, max_tokens=20, first=50)
    sched.add(r0)
    sched.add(r1)
    assert plan(step(sched)) == [("r0", 4, True)]
    assert plan(step(sched)) == [("r0", 1, True), ("r1", 3, False)]  # r0: 2 blocks, r1: 1
    assert plan(step(sched)) == [("r0", 1, True), ("r1", 1, True)]
    out = step(sched)  # r1's token 5 needs a 2nd block; r1 is the newest, so it preempts itself
    assert plan(out) == [("r0", 1, True)] and out.preempted == [r1]
    # A 3-token chunk of r1 would fit in the 1 free block, but a step that preempted admits nobody.
    assert sched.kv.num_free_blocks == 1 and r1.status == RequestStatus.WAITING
    assert plan(step(sched)) == [("r0", 1, True), ("r1", 3, False)]


def test_repeated_preemption_keeps_arrival_order():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_tokens=100, prefix_caching=False)
    reqs = [make_request(f"r{i}", 4, max_tokens=5, first=100 * i) for i in range(4)]
    for r in reqs:
        sched.add(r)
    assert plan(step(sched)) == [(f"r{i}", 4, True) for i in range(4)]
    out = step(sched)  # each needs a 2nd block: r0 preempts r3, r1 preempts r2
    assert plan(out) == [("r0", 1, True), ("r1", 1, True)]
    assert out.preempted == [reqs[3], reqs[2]]
    assert [r.request_id for r in sched.waiting] == ["r2", "r3"]


# ---- requests in and out -----------------------------------------------------------------------

# ---- capacity policy ---------------------------------------------------------------------------

def _run_to_end(sched: Scheduler, max_steps: int = 500) -> tuple[int, int]:
    """Steps until every request ends; (most sequences running at once, preemptions)."""
    most = preemptions = 0
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return most, preemptions
        out = step(sched)
        most, preemptions = max(most, sched.num_running), preemptions + len(out.preempted)
    raise AssertionError(f"{max_steps} steps and requests are still unfinished")


def test_guaranteed_no_evict_admits_only_what_can_finish():
    # 6 requests of 4 prompt + 12 output tokens: 4 blocks of 4 each at the end, 16 blocks in all.
    def run(policy):
        sched = make_scheduler(num_blocks=16, block_size=4, max_num_tokens=64, policy=policy)
        reqs = [make_request(f"r{i}", 4, max_tokens=12, first=10 * i) for i in range(6)]
        for r in reqs:
            sched.add(r)
        return _run_to_end(sched), reqs
    (most, preemptions), reqs = run("max_utilization")
    assert preemptions > 0 and most == 6  # all admitted at once (one block each), then they collide
    (most, preemptions), reqs = run("guaranteed_no_evict")
    assert preemptions == 0 and most == 4  # 4 x 4 blocks reserved: the other two wait
    assert all(len(r.output_token_ids) == 12 and r.status == RequestStatus.FINISHED_LENGTH for r in reqs)


def test_guaranteed_no_evict_reserves_what_running_requests_still_need():
    sched = make_scheduler(num_blocks=10, block_size=4, policy="guaranteed_no_evict")
    sched.add(make_request("long", 4, max_tokens=28))  # 8 blocks at the end
    step(sched)
    sched.add(make_request("short", 4, max_tokens=4))  # 2 blocks at the end
    sched.add(make_request("next", 4, max_tokens=4))
    step(sched)
    # 7 blocks still to come for "long" + 2 for "short" fill the 9 free; "next" waits
    assert [r.request_id for r in sched.waiting] == ["next"] and sched.num_running == 2


def test_guaranteed_no_evict_admits_a_request_alone_whatever_it_needs():
    sched = make_scheduler(num_blocks=4, block_size=4, policy="guaranteed_no_evict")
    sched.add(make_request("huge", 4, max_tokens=None))  # bounded by nothing: the whole pool and more
    assert plan(step(sched)) == [("huge", 4, True)]


def test_capacity_policy_is_validated():
    with pytest.raises(ValueError, match="capacity_scheduler_policy='no_evict'"):
        SchedulerConfig(capacity_scheduler_policy="no_evict")


def test_abort_frees_blocks():
    sched = make_scheduler(num_blocks=8, block_size=4)
    sched.add(make_request("a", 9, max_tokens=10))
    sched.add(make_request("b", 3, first=50))
    step(sched)
    assert sched.kv.num_free_blocks == 8 - 3 - 1
    aborted = sched.abort("a")
    assert aborted is not None and aborted.status == RequestStatus.FINISHED_ABORTED
    assert aborted.block_ids == [] and sched.kv.num_free_blocks == 8 - 1
    assert sched.num_running == 1
    assert sched.abort("a") is None and sched.abort("nobody") is None
    assert plan(step(sched)) == [("b", 1, True)]


def test_abort_waiting_and_in_flight_requests():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_tokens=4)
    sched.add(make_request("a", 6))
    sched.add(make_request("w", 3, first=50))
    out = sched.schedule()
    assert plan(out) == [("a", 4, False)]
    sched.abort("w")  # still waiting
    assert sched.num_waiting == 0
    sched.abort("a")  # aborted while its step runs: the step's result is dropped
    assert sched.update_from_output(out, sampled([])) == []
    assert not sched.has_unfinished
    assert sched.kv.num_free_blocks == 8
    assert sched.schedule().chunks == []


def test_add_rejects_requests_that_can_never_run():
    sched = make_scheduler(num_blocks=2, block_size=4)  # 8 token slots
    fits = make_request("fits", 7)
    sched.add(fits)  # 7 + 1 = 8
    with pytest.raises(ValueError, match="8 tokens plus one generated token needs 3 KV blocks"):
        sched.add(make_request("too_long", 8))
    with pytest.raises(ValueError, match="already queued"):
        sched.add(make_request("fits", 3))
    with pytest.raises(ValueError, match="empty"):
        sched.add(make_request("empty", 0))
    with pytest.raises(ValueError, match="finished status"):
        sched.finish(fits, RequestStatus.RUNNING)


def test_generation_outgrowing_the_pool_finishes_for_length():
    sched = make_scheduler(num_blocks=2, block_size=4)
    req = make_request("r", 7, max_tokens=None)
    sched.add(req)
    assert plan(step(sched)) == [("r", 7, True)]
    assert plan(step(sched)) == [("r", 1, True)]  # computes token 8: the pool is full
    out = step(sched)  # token 9 can never be held
    assert out.chunks == [] and out.finished == [req]
    assert req.status == RequestStatus.FINISHED_LENGTH and len(req.output_token_ids) == 2
    assert sched.kv.num_free_blocks == 2 and not sched.has_unfinished


def test_prefix_cache_applies_at_admission():
    sched = make_scheduler(num_blocks=16, block_size=4)
    sched.add(make_request("a", 12, max_tokens=1))
    step(sched)
    b, c = make_request("b", 14), make_request("c", 12)
    sched.add(b)  # same first 12 tokens: 3 cached blocks
    out = step(sched)
    assert plan(out) == [("b", 2, True)]
    assert b.num_cached_prompt_tokens == 12
    sched.add(c)  # fully cached prompt: the last block is recomputed
    out = step(sched)
    assert plan(out) == [("b", 1, True), ("c", 4, True)]
    assert c.num_cached_prompt_tokens == 8


# ---- a long random run -------------------------------------------------------------------------

def prefix_ids(tokens: list[int]) -> list[int]:
    """An id per position standing for the whole prefix up to it: what a KV entry depends on."""
    ids, running = [], 0
    for t in tokens:
        running = hash((running, t))
        ids.append(running)
    return ids


def check_step(sched: Scheduler, out: SchedulerOutput, cfg: dict, kv_store: dict) -> None:
    kv = sched.kv
    assert out.num_tokens == sum(c.num_new_tokens for c in out.chunks) <= cfg["max_num_tokens"]
    assert len(out.chunks) <= cfg["max_batch_size"]
    assert len({id(c.request) for c in out.chunks}) == len(out.chunks)
    # Oldest first across the whole step: decodes and running chunks, then FIFO admissions.
    arrivals = [c.request.arrival_index for c in out.chunks]
    assert arrivals == sorted(arrivals)
    waiting = [r.arrival_index for r in sched.waiting]
    assert waiting == sorted(waiting)
    bs = kv.block_size
    for chunk in out.chunks:
        req, start = chunk.request, chunk.start
        end = start + chunk.num_new_tokens
        assert req.num_computed_tokens == end  # advanced when scheduled
        # The plain loop: every token before this step's is known; a sampling chunk adds one placeholder.
        assert chunk.num_new_tokens >= 1 and end <= req.num_tokens
        assert chunk.is_sampling == (end == req.num_tokens)
        assert req.num_output_placeholders == chunk.is_sampling
        assert len(req.block_ids) * bs >= end
        ids = prefix_ids(req.all_token_ids[:end])
        for p in range(start):  # what the request reads was computed for exactly its prefix
            assert kv_store[req.block_ids[p // bs]][p % bs] == ids[p]
        for p in range(start, end):  # what it writes belongs to it alone
            block = req.block_ids[p // bs]
            assert kv.ref_count(block) == 1
            kv_store.setdefault(block, [None] * bs)[p % bs] = ids[p]


def check_blocks(sched: Scheduler, live: list[Request]) -> None:
    kv = sched.kv
    holders = [0] * kv.num_blocks
    for req in live:
        assert len(set(req.block_ids)) == len(req.block_ids)
        for b in req.block_ids:
            holders[b] += 1
    assert holders == [kv.ref_count(b) for b in range(kv.num_blocks)]
    assert kv.num_free_blocks == holders.count(0)


VOCAB = 4  # tiny, so that equal blocks after different prefixes are common


def make_random_requests(rng: random.Random, num_requests: int, max_total: int) -> list[Request]:
    """Prompts that often share a prefix (of any length) with one of three base sequences."""
    bases = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(3)]
    requests = []
    for i in range(num_requests):
        total = rng.randint(2, max_total)
        num_prompt = rng.randint(1, total - 1)
        base = rng.choice(bases)
        num_shared = rng.randint(0, min(num_prompt, len(base)))
        prompt = base[:num_shared] + [rng.randrange(VOCAB) for _ in range(num_prompt - num_shared)]
        params = SamplingParams(max_tokens=total - num_prompt)
        requests.append(Request(f"r{i}", prompt, params, arrival_index=i))
    return requests


@pytest.mark.parametrize("seed, num_blocks, block_size, max_num_tokens, max_batch_size, prefix_caching, policy", [
    (0, 12, 4, 16, 4, True, "max_utilization"),
    (1, 24, 2, 8, 16, True, "max_utilization"),
    (2, 10, 8, 48, 3, True, "max_utilization"),
    (3, 12, 4, 16, 4, False, "max_utilization"),
    (4, 64, 4, 32, 8, True, "max_utilization"),
    (5, 12, 4, 16, 4, True, "guaranteed_no_evict"),
    (6, 24, 2, 8, 16, False, "guaranteed_no_evict"),
])
def test_random_run_terminates_and_frees_everything(seed, num_blocks, block_size, max_num_tokens,
                                                    max_batch_size, prefix_caching, policy):
    rng = random.Random(seed)
    cfg = {"num_blocks": num_blocks, "block_size": block_size, "max_num_tokens": max_num_tokens,
           "max_batch_size": max_batch_size}
    sched = make_scheduler(prefix_caching=prefix_caching, policy=policy, **cfg)
    requests = make_random_requests(rng, 80, max_total=min(48, num_blocks * block_size))
    pending, live = list(requests), []
    kv_store: dict[int, list] = {}
    num_preempted = 0
    for _ in range(5000):
        if not pending and not sched.has_unfinished:
            break
        for _ in range(rng.randint(0, 2)):
            if pending:
                live.append(pending.pop(0))
                sched.add(live[-1])
        if live and rng.random() < 0.02:
            victim = rng.choice(live)
            assert sched.abort(victim.request_id) is victim
        out = sched.schedule()
        assert out.finished == []  # every request fits the pool by construction
        num_preempted += len(out.preempted)
        check_step(sched, out, cfg, kv_store)
        sched.update_from_output(out, sampled([rng.randrange(VOCAB) for c in out.chunks if c.is_sampling]))
        live = [r for r in live if not r.status.is_finished]
        check_blocks(sched, live)
        assert sched.num_running + sched.num_waiting == len(live)
    else:
        pytest.fail(f"no termination after 5000 steps: {sched.num_running} running, "
                    f"{sched.num_waiting} waiting, config {cfg}")
    assert sched.kv.num_free_blocks == num_blocks
    assert all(sched.kv.ref_count(b) == 0 for b in range(num_blocks))
    for req in requests:
        assert req.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)
        assert req.block_ids == []
        if req.status == RequestStatus.FINISHED_LENGTH:
            assert len(req.output_token_ids) == req.params.max_tokens
    num_hit_tokens = sum(r.num_cached_prompt_tokens for r in requests)
    if policy == "guaranteed_no_evict":  # every admitted request had its whole length reserved
        assert num_preempted == 0
    elif num_blocks <= 24:  # the tight pools must have exercised preemption
        assert num_preempted > 0
    assert (num_hit_tokens > 0) == prefix_caching
