"""The scheduler over a long random run: every step keeps the budgets, the order and the KV
blocks' contents consistent, and every request ends with its blocks freed."""
from __future__ import annotations

import random

import pytest

from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.scheduler import Scheduler, SchedulerOutput
from meshlm.sampling_params import SamplingParams
from tests.unit.scheduler_steps import make_scheduler, sampled


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
