"""At tp=2 the overlapped step loop (each step's tokens broadcast to the TP group on the device and
fed to the next step there) gives the plain loop's tokens, with seeded sampling, chunked prefill
and preemption in a small KV pool."""
from __future__ import annotations

import random

import pytest

from tests.dist.harness import LayoutRuns

pytestmark = pytest.mark.timeout(300)

# 20 blocks of 4 tokens and 24 tokens a step for 6 prompts of up to 30 tokens: chunks and preemption.
ENGINE = {"num_kv_blocks": 20, "block_size": 4, "max_model_len": 80, "max_num_tokens": 24}
PROMPT_LENGTHS = (30, 5, 17, 26, 9, 21)
SAMPLING = {"max_tokens": 12, "ignore_eos": True, "logprobs": 2}


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory, tiny_models) -> LayoutRuns:
    rng = random.Random(77)
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in PROMPT_LENGTHS]
    model = str(tiny_models["llama"])
    jobs = [{"name": f"{loop}-{kind}", "model": model, "prompts": prompts, **ENGINE, **SAMPLING,
             "async_scheduling": loop == "overlapped", **extra}
            for loop in ("overlapped", "plain")
            for kind, extra in (("greedy", {}), ("seeded", {"temperature": 0.9, "seed": 5}))]
    return LayoutRuns(tmp_path_factory.mktemp("loop-runs"), jobs)


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_overlapped_loop_matches_plain_loop_at_tp2(loop_runs, kind):
    results = loop_runs.get(2, 1)
    plain, overlapped = results[f"plain-{kind}"], results[f"overlapped-{kind}"]
    assert len(plain) == len(PROMPT_LENGTHS)
    for i, (p, o) in enumerate(zip(plain, overlapped)):
        assert o["token_ids"] == p["token_ids"], f"{kind} prompt {i}"
        assert len(p["token_ids"]) == SAMPLING["max_tokens"]
        for p_step, o_step in zip(p["logprobs"], o["logprobs"], strict=True):
            assert list(o_step) == list(p_step), f"{kind} prompt {i}"
            assert o_step == pytest.approx(p_step, abs=1e-4), f"{kind} prompt {i}"
