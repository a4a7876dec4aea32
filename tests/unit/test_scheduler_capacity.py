"""The scheduler's capacity policies: max_utilization admits what fits now and preempts when the pool
runs out; guaranteed_no_evict admits only requests whose whole generation the pool can hold."""
from __future__ import annotations

import pytest

from meshlm.config import SchedulerConfig
from meshlm.engine.request import RequestStatus
from meshlm.engine.scheduler import Scheduler
from tests.unit.scheduler_steps import make_request, make_scheduler, plan, step


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
