"""The in-flight batching scheduler: budgets, chunked prefill, FIFO admission, preemption, aborts
(the capacity policies: test_scheduler_capacity.py; a long random run: test_scheduler_random_run.py)."""
from __future__ import annotations

import pytest

from meshlm.engine.request import RequestStatus
from tests.unit.scheduler_steps import make_request, make_scheduler, plan, sampled, step


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
