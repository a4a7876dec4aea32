"""The overlapped step loop (async_scheduling) gives exactly the plain loop's outputs: greedy and
seeded sampling, penalties, n > 1, logprobs, stop ids and strings, max_tokens, preemption in a
tiny KV pool, and aborts mid-generation."""
from __future__ import annotations

import numpy as np
import pytest

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model

pytestmark = pytest.mark.timeout(180)

VOCAB_SIZE = 320
ENGINE = dict(num_kv_blocks=128, block_size=4, max_model_len=128)
# 24 blocks of 4 tokens and 32 tokens a step: the batch below preempts and prefills in chunks.
TINY_POOL = dict(num_kv_blocks=24, block_size=4, max_model_len=96, max_num_tokens=32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=11, vocab_size=VOCAB_SIZE))


def prompts_of(lengths, seed: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in lengths]


def run(model_path: str, async_scheduling: bool, prompts, params, **engine) -> list[list[tuple]]:
    """Every sample of every request: (token ids, text, finish reason, stop reason, logprobs)."""
    with LLM(model_path, async_scheduling=async_scheduling, **{**ENGINE, **engine}) as llm:
        outputs = llm.generate(prompts, params)
        assert llm.engine_core.kv_cache_usage == 0.0  # every block came back
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
            for o in outputs]


def assert_same(plain, overlapped, tol: float = 1e-5) -> None:
    assert len(plain) == len(overlapped)
    for i, (p_req, o_req) in enumerate(zip(plain, overlapped)):
        for p, o in zip(p_req, o_req, strict=True):
            assert o[:4] == p[:4], f"request {i}"
            assert (o[4] is None) == (p[4] is None), f"request {i}"
            for p_step, o_step in zip(p[4] or [], o[4] or [], strict=True):
                assert list(o_step) == list(p_step), f"request {i}: other top tokens"
                np.testing.assert_allclose(list(o_step.values()), list(p_step.values()), atol=tol)


def test_sampling_kinds_match_the_plain_loop(model_path):
    prompts = prompts_of((5, 17, 9, 30, 12, 3, 22, 8))
    params = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, seed=8, n=3, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, logprobs=3, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=9, repetition_penalty=1.4, presence_penalty=0.5,
                       frequency_penalty=0.3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=10, min_p=0.05, logprobs=0, max_tokens=11),
        SamplingParams(temperature=0.0, min_tokens=4, max_tokens=8),
    ]
    assert_same(run(model_path, False, prompts, params), run(model_path, True, prompts, params))


def test_stops_found_a_step_late_match_the_plain_loop(model_path):
    prompts = prompts_of((6, 11, 4, 19), seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reference = run(model_path, False, prompts, greedy)
    # Stop ids and strings the plain run meets mid-generation, so that both loops stop there.
    stop_ids = [reference[0][0][0][5], reference[1][0][0][3]]
    words = reference[2][0][1].split()
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_ids[0]]),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_ids[1]]),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[words[4]]),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[words[4]],
                             include_stop_str_in_output=True)]
    plain = run(model_path, False, prompts, params)
    assert [r[0][2] for r in plain[:3]] == ["stop"] * 3 and plain[2][0][3] == words[4]
    assert all(len(r[0][0]) < 16 for r in plain[:3])
    assert_same(plain, run(model_path, True, prompts, params))


def test_preemption_in_a_tiny_pool_matches_the_plain_loop(model_path):
    prompts = prompts_of((45, 3, 17, 38, 9, 50, 26, 33, 12, 41), seed=5)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=8 + i, ignore_eos=True)
              for i in range(len(prompts))]
    plain = run(model_path, False, prompts, params, **TINY_POOL)
    with LLM(model_path, async_scheduling=True, **TINY_POOL) as llm:
        scheduler = llm.engine_core.scheduler
        schedule, preempted_in_flight = scheduler.schedule, []

        def recording_schedule():
            out = schedule()
            preempted_in_flight.extend(r.request_id for r in out.preempted if r.num_output_placeholders)
            return out

        scheduler.schedule = recording_schedule
        outputs = llm.generate(prompts, params)
        assert llm.engine_core.kv_cache_usage == 0.0
    overlapped = [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs]
                  for o in outputs]
    assert preempted_in_flight, "no request was preempted with a token in flight"
    assert_same(plain, overlapped)


def generate_with_abort(model_path: str, async_scheduling: bool, prompts, params, abort_after: int):
    """Run every request to the end, aborting the second one after ``abort_after`` steps."""
    with LLM(model_path, async_scheduling=async_scheduling, **ENGINE) as llm:
        core = llm.engine_core
        ids = [core.submit(p, params) for p in prompts]
        got = {rid: [] for rid in ids}
        for num_steps in range(200):
            if num_steps == abort_after:
                assert core.abort(ids[1])
            for out in core.step():
                got[out.request_id] += out.outputs[0].token_ids
            if not core.has_unfinished():
                break
        core.step()  # the ranks hear of the finished requests
        assert core.kv_cache_usage == 0.0 and not core.has_pending_notices()
        assert llm.local_model_runner().sampler.num_requests == 0
    return [got[rid] for rid in ids]


def test_abort_mid_generation_matches_the_plain_loop(model_path):
    prompts = prompts_of((7, 12, 5), seed=6)
    params = SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)
    plain = generate_with_abort(model_path, False, prompts, params, abort_after=4)
    overlapped = generate_with_abort(model_path, True, prompts, params, abort_after=4)
    assert overlapped[0] == plain[0] and overlapped[2] == plain[2]
    assert len(plain[0]) == 12 and len(plain[1]) < 12
    # The aborted request's tokens, however many arrived before the abort, are the same tokens.
    assert 0 < len(overlapped[1]) and overlapped[1] == plain[1][:len(overlapped[1])]


def test_start_up_heap_is_frozen_while_the_engine_runs_and_released_at_shutdown(model_path):
    """The collector skips the start-up heap while an engine runs (api/build.py) and gets it back at
    shutdown, so a second engine in the same process can free the first one's cycles."""
    import gc
    gc.unfreeze()
    with LLM(model_path, **ENGINE) as llm:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] >= 50_000
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert gc.get_freeze_count() == 0


def test_every_step_plan_rebuilds_its_block_tables_from_changes(model_path):
    """The plans of a run with preemption, forks (n = 2) and requests that finish, each sent
    through a pair of BlockTableMirrors as the MPI channel sends them: every table rebuilt
    exactly; a step's slots are distinct, and finished sequences' slots are taken again."""
    from meshlm.protocol import BlockTableMirror, Envelope, MessageKind, decode_envelope, encode_envelope
    prompts = prompts_of((45, 3, 17, 38, 9, 50, 26, 33, 12, 41), seed=6)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=6 + i, ignore_eos=True, n=1 + i % 2)
              for i in range(len(prompts))]
    sender, receiver, slots_seen, num_plans = BlockTableMirror(), BlockTableMirror(), set(), 0
    with LLM(model_path, async_scheduling=True, **TINY_POOL) as llm:
        dispatcher = llm.engine_core.dispatcher
        execute = dispatcher.execute

        def checking_execute(plan):
            nonlocal num_plans
            if plan.num_seqs:
                num_plans += 1
                assert len(plan.seq_slots) == plan.num_seqs == len(set(plan.seq_slots.tolist()))
                slots_seen.update(plan.seq_slots.tolist())
                got = decode_envelope(encode_envelope(Envelope(MessageKind.STEP, plan), sender), receiver).plan
                assert np.array_equal(got.block_tables, plan.block_tables)
            return execute(plan)

        dispatcher.execute = checking_execute
        llm.generate(prompts, params)
        assert llm.engine_core.scheduler_stats.num_preemptions > 0
    num_sequences = sum(p.n for p in params)
    assert num_plans > 10 and max(slots_seen) < num_sequences - 1, (num_plans, sorted(slots_seen))


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["overlapped", "plain"])
def test_block_tables_kept_between_steps_equal_tables_built_whole(model_path, async_scheduling):
    """BlockTableRows (appends copied, other changes rewritten) against the tables built from every
    chunk's block_ids, each step of a run with preemption, forks (n = 2) and finished sequences
    whose slots others take."""
    from meshlm.engine import coordinator as coordinator_module
    from meshlm.engine.plan_builder import _block_tables
    prompts = prompts_of((45, 3, 17, 38, 9, 50, 26, 33, 12, 41), seed=8)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=6 + i, ignore_eos=True, n=1 + i % 2)
              for i in range(len(prompts))]
    build, num_checked = coordinator_module.build_step_plan, 0

    def checking_build(chunks, *args):
        nonlocal num_checked
        plan = build(chunks, *args)
        assert np.array_equal(plan.block_tables, _block_tables([c.request.block_ids for c in chunks]))
        num_checked += 1
        return plan

    coordinator_module.build_step_plan = checking_build
    try:
        with LLM(model_path, async_scheduling=async_scheduling, **TINY_POOL) as llm:
            llm.generate(prompts, params)
            assert llm.engine_core.scheduler_stats.num_preemptions > 0
    finally:
        coordinator_module.build_step_plan = build
    assert num_checked > 10
