"""n > 1 prefills its prompt once: the samples fork the prompt's KV blocks, copy-on-write.

Block accounting on the scheduler alone, then the engine on a tiny random model: n seeded samples
equal n separate requests with the per-sample seeds (seed + index), through preemption and aborts,
and every block comes back.
"""
from __future__ import annotations

import numpy as np
import pytest

from meshlm import LLM, SamplingParams
from meshlm.config import SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager, num_blocks_for
from meshlm.engine.request import Request, RequestStatus
from meshlm.engine.scheduler import Scheduler
from meshlm.protocol import StepResult
from tests.model_factory import make_random_model
from tests.preemptions import record_preemptions

pytestmark = pytest.mark.timeout(180)

BLOCK_SIZE = 4
VOCAB_SIZE = 320


def forked_request(num_prompt: int, n: int, max_tokens: int = 6) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prompt = list(range(10, 10 + num_prompt))
    parent = Request("r#0", prompt, params)
    parent.forks = [Request(f"r#{i}", list(prompt), params, index=i) for i in range(1, n)]
    return parent


def run_step(sched: Scheduler):
    out = sched.schedule()
    num_rows = sum(1 + len(c.forked) for c in out.chunks if c.is_sampling)
    sched.update_from_output(out, StepResult(np.arange(num_rows, dtype=np.int64) + 100, None, None, None))
    return out


def test_forked_samples_share_the_prompt_blocks_and_copy_the_partial_one():
    num_blocks, num_prompt, n = 64, 10, 4  # 10 tokens: 2 full blocks and one holding 2 tokens
    kv = KVCacheManager(num_blocks, BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(max_num_tokens=64, max_batch_size=8), kv)
    parent = forked_request(num_prompt, n)
    children = list(parent.forks)
    sched.add(parent)
    prompt_blocks = num_blocks_for(num_prompt, BLOCK_SIZE)

    out = run_step(sched)  # prefill once; all n sample their first token from it
    assert [c.num_new_tokens for c in out.chunks] == [num_prompt]
    assert out.chunks[0].forked == children
    assert num_blocks - kv.num_free_blocks == prompt_blocks  # not n x prompt_blocks
    assert all(c.block_ids == parent.block_ids for c in children)
    assert [kv.ref_count(b) for b in parent.block_ids] == [n] * prompt_blocks
    assert [len(r.output_token_ids) for r in (parent, *children)] == [1] * n

    out = run_step(sched)  # every sample writes position 10, in the shared partial block
    assert len(out.chunks) == n and not any(c.forked for c in out.chunks)
    # The first n - 1 writers get a copy; the last holder writes the block in place.
    assert len(out.block_copies) == n - 1
    srcs = {src for src, _ in out.block_copies}
    assert len(srcs) == 1 and children[-1].block_ids[-1] in srcs
    assert num_blocks - kv.num_free_blocks == prompt_blocks + (n - 1)
    full_blocks = parent.block_ids[:2]
    assert all(r.block_ids[:2] == full_blocks for r in children)  # full prompt blocks stay shared
    assert len({r.block_ids[-1] for r in (parent, *children)}) == n

    for _ in range(10):
        run_step(sched)
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in (parent, *children))
    assert kv.num_free_blocks == num_blocks


def test_abort_before_the_fork_finishes_every_sample_and_frees_its_blocks():
    kv = KVCacheManager(64, BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(max_num_tokens=8, max_batch_size=8), kv)
    parent = forked_request(20, 3)  # 20 tokens at 8 a step: the prefill takes three steps
    children = list(parent.forks)
    sched.add(parent)
    out = run_step(sched)
    assert not out.chunks[0].is_sampling and kv.num_free_blocks == 62
    sched.abort(parent.request_id)
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in (parent, *children))
    assert kv.num_free_blocks == 64 and not sched.has_unfinished


# ---- the engine on a tiny random model ------------------------------------------------------------

ENGINE = dict(num_kv_blocks=128, block_size=BLOCK_SIZE, max_model_len=128)
TINY_POOL = dict(num_kv_blocks=20, block_size=BLOCK_SIZE, max_model_len=64, max_num_tokens=32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=5, vocab_size=VOCAB_SIZE))


def prompts_of(lengths, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in lengths]


def samples(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


def generate(llm: LLM, prompts, params) -> list[list[list[int]]]:
    core = llm.engine_core
    out = samples(llm.generate(prompts, params))
    assert core.kv.num_free_blocks == core.num_kv_blocks  # no block leaked
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_n_seeded_samples_equal_separate_requests_with_the_per_sample_seeds(model_path, async_scheduling):
    prompts = prompts_of((10, 7, 17))  # none a multiple of the block size: a partial block is shared
    n, seed = 4, 21
    forked = SamplingParams(n=n, temperature=0.9, seed=seed, max_tokens=9, ignore_eos=True, logprobs=2)
    with LLM(model_path, async_scheduling=async_scheduling, **ENGINE) as llm:
        got = generate(llm, prompts, forked)
        separate = [SamplingParams(temperature=0.9, seed=seed + i, max_tokens=9, ignore_eos=True)
                    for i in range(n)]
        want = [[generate(llm, [p], s)[0][0] for s in separate] for p in prompts]
    assert got == want
    assert all(len({tuple(t) for t in sample}) > 1 for sample in got)  # the samples differ


def test_prompt_prefilled_once_for_n_samples(model_path):
    prompt = prompts_of((13,))[0]
    with LLM(model_path, **ENGINE) as llm:
        scheduler = llm.engine_core.scheduler
        schedule, num_prompt_tokens = scheduler.schedule, []

        def recording_schedule():
            out = schedule()
            num_prompt_tokens.extend(c.num_new_tokens for c in out.chunks if c.start == 0)
            return out

        scheduler.schedule = recording_schedule
        generate(llm, [prompt], SamplingParams(n=5, temperature=1.0, seed=3, max_tokens=4))
    assert num_prompt_tokens == [13]


def test_preempted_forks_and_aborted_parents_leak_no_block(model_path):
    prompts = prompts_of((21, 14, 30), seed=9)
    params = SamplingParams(n=3, temperature=0.7, seed=5, max_tokens=12, ignore_eos=True)
    with LLM(model_path, **ENGINE) as llm:
        want = generate(llm, prompts, params)
    with LLM(model_path, **TINY_POOL) as llm:
        core = llm.engine_core
        preempted = record_preemptions(core)
        assert generate(llm, prompts, params) == want
        assert any("#" in rid and not rid.endswith("#0") for rid in preempted), preempted
        ids = [core.submit(p, params) for p in prompts]
        for _ in range(4):
            core.step()
        for request_id in ids:
            assert core.abort(request_id)
        core.step()  # the ranks hear of the aborted sequences
        assert core.kv.num_free_blocks == core.num_kv_blocks
        assert llm.local_model_runner().sampler.num_requests == 0


def test_block_copies_and_repeated_sample_rows_cross_the_wire():
    from meshlm.protocol import Envelope, MessageKind, StepPlan, decode_envelope, encode_envelope
    plan = StepPlan.empty()
    plan.sample_rows = np.array([0, 0, 0], np.int64)
    plan.block_copies = np.array([[3, 7], [3, 9]], np.int64)
    got = decode_envelope(encode_envelope(Envelope(MessageKind.STEP, plan))).plan
    assert got.block_copies.tolist() == [[3, 7], [3, 9]] and got.sample_rows.tolist() == [0, 0, 0]


def test_a_request_and_its_forks_are_admitted_when_all_fit_the_batch():
    kv = KVCacheManager(64, BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(max_num_tokens=64, max_batch_size=4), kv)
    first = Request("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add(first)
    run_step(sched)
    four = forked_request(6, 4, max_tokens=2)  # 1 running + 4 > max_batch_size: waits
    sched.add(four)
    admitted = []
    while sched.has_unfinished:
        out = run_step(sched)
        admitted += [c.request.request_id for c in out.chunks if c.start == 0]
        assert sum(1 + len(c.forked) for c in out.chunks if c.is_sampling) <= 4
        if four.request_id in admitted:
            assert first.is_finished
    assert admitted == [four.request_id]
    big = forked_request(6, 6, max_tokens=2)  # more forks than max_batch_size: runs alone
    sched.add(big)
    out = run_step(sched)
    assert len(out.chunks[0].forked) == 5 and kv.num_free_blocks < 64
    while sched.has_unfinished:
        run_step(sched)
    assert kv.num_free_blocks == 64
