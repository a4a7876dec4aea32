"""Scheduler tests' steps: a scheduler over a small pool, requests of counted tokens, and one
engine step that samples a token for each sampling chunk (tests/unit/test_scheduler*.py)."""
from __future__ import annotations

import numpy as np

from meshlm.config import SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.request import Request
from meshlm.engine.scheduler import Scheduler, SchedulerOutput
from meshlm.protocol import StepResult
from meshlm.sampling_params import SamplingParams


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
