"""The scheduler under the overlapped loop: step n+1 is scheduled before step n's tokens are
appended, so the tokens in flight are counted as output placeholders."""
from __future__ import annotations

import numpy as np

from meshlm.config import SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.scheduler import Scheduler, SchedulerOutput
from meshlm.protocol import StepResult
from meshlm.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_num_tokens=100, max_batch_size=8), kv)


def make_request(request_id: str, num_prompt: int, first: int = 0, **params) -> Request:
    return Request(request_id, [first + i for i in range(num_prompt)], SamplingParams(**params))


def tokens(out: SchedulerOutput, token_id_of) -> StepResult:
    """The step's sampled tokens: ``token_id_of(request)`` for each sampling chunk, in row order."""
    ids = [token_id_of(c.request) for c in out.chunks if c.is_sampling]
    return StepResult(np.array(ids, dtype=np.int64), None, None, None)


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.request.request_id, c.start, c.num_new_tokens, c.is_sampling) for c in out.chunks]


def test_a_decode_is_scheduled_on_the_token_in_flight():
    sched = make_scheduler()
    r = make_request("r", 5, max_tokens=10)
    sched.add(r)
    first = sched.schedule()
    assert plan(first) == [("r", 0, 5, True)]
    assert (r.num_computed_tokens, r.num_output_placeholders) == (5, 1)
    second = sched.schedule()  # before the first step's token is appended
    assert plan(second) == [("r", 5, 1, True)]  # its input is the token in flight
    assert (r.num_computed_tokens, r.num_output_placeholders, r.output_token_ids) == (6, 2, [])
    assert sched.update_from_output(first, tokens(first, lambda _: 70)) == [r]
    assert (r.num_output_placeholders, r.output_token_ids) == (1, [70])
    third = sched.schedule()
    assert plan(third) == [("r", 6, 1, True)]
    sched.update_from_output(second, tokens(second, lambda _: 71))
    sched.update_from_output(third, tokens(third, lambda _: 72))
    assert (r.num_output_placeholders, r.output_token_ids, r.num_computed_tokens) == (0, [70, 71, 72], 7)


def test_tokens_in_flight_that_reach_max_tokens_stop_the_scheduling():
    sched = make_scheduler()
    r = make_request("r", 5, max_tokens=2)
    sched.add(r)
    first, second = sched.schedule(), sched.schedule()
    assert r.num_output_placeholders == 2 and r.is_capped_by_placeholders
    assert sched.schedule().is_empty  # the two tokens in flight finish it: no third
    sched.update_from_output(first, tokens(first, lambda _: 70))
    sched.update_from_output(second, tokens(second, lambda _: 71))
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == [70, 71]
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_a_stop_found_one_step_late_drops_the_extra_token():
    sched = make_scheduler()
    r, other = make_request("r", 5, max_tokens=10, stop_token_ids=[9]), make_request("o", 3, first=20, max_tokens=10)
    sched.add(r)
    sched.add(other)
    first = sched.schedule()
    second = sched.schedule()  # a decode of r on a token that turns out to be its stop id
    assert [c.request for c in second.chunks] == [r, other]
    sched.update_from_output(first, tokens(first, lambda req: 9 if req is r else 30))
    assert r.status == RequestStatus.FINISHED_STOPPED and r.block_ids == []
    got = sched.update_from_output(second, tokens(second, lambda req: 50 if req is r else 31))
    assert got == [other]  # r's extra token is dropped
    assert r.output_token_ids == [9] and other.output_token_ids == [30, 31]
    assert [c.request for c in sched.schedule().chunks] == [other]


def test_an_abort_with_a_token_in_flight_drops_it():
    sched = make_scheduler()
    r = make_request("r", 5, max_tokens=10)
    sched.add(r)
    first = sched.schedule()
    sched.abort("r")
    assert sched.update_from_output(first, tokens(first, lambda _: 70)) == []
    assert r.output_token_ids == [] and r.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_a_request_preempted_with_a_token_in_flight_keeps_it():
    # 4 blocks of 4. r0 and r1 hold 2 blocks each after their prefill; r0's third token needs a
    # third block while r1's decode token is still in flight: r1 (newest) is preempted.
    sched = make_scheduler(num_blocks=4, block_size=4)
    r0, r1 = make_request("r0", 7, max_tokens=3), make_request("r1", 7, first=50, max_tokens=4)
    sched.add(r0)
    sched.add(r1)
    prefill = sched.schedule()
    decode = sched.schedule()  # tokens 8 of both, still in their second block
    sched.update_from_output(prefill, tokens(prefill, lambda req: 100 + len(req.request_id)))
    preempting = sched.schedule()  # r0's token 9 needs a third block
    assert preempting.preempted == [r1] and plan(preempting) == [("r0", 8, 1, True)]
    assert r1.status == RequestStatus.WAITING and r1.num_output_placeholders == 1
    sched.update_from_output(decode, tokens(decode, lambda req: 200 if req is r0 else 201))
    assert r1.output_token_ids == [102, 201] and r1.num_output_placeholders == 0  # kept
    sched.update_from_output(preempting, tokens(preempting, lambda _: 300))
    resumed = sched.schedule()  # r0 finished (3 tokens) and gave its blocks back
    assert r0.status == RequestStatus.FINISHED_LENGTH
    assert plan(resumed) == [("r1", 0, 9, True)]  # its prompt and both kept outputs, recomputed
