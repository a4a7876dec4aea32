"""The start-up's synthetic mixed steps (executor/warmup.py) under mpiexec: every rank runs the
same steps, so tensor- and pipeline-parallel ranks meet in their collectives and stage transfers as
in any step (a rank with another list would hang), and the requests after them give the
single-rank results. On the CPU the engine skips the warm-up (nothing compiles on first use), so
``run_layout.py --warm-up`` forces it on every rank."""
from __future__ import annotations

import pytest

from tests.dist.harness import TINY_MAX_TOKENS, LayoutRuns, assert_top_logprobs_close

pytestmark = pytest.mark.timeout(300)

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}
LOGPROB_TOL = 1e-4  # fp32, as tests/dist/test_layouts.py


@pytest.fixture(scope="module")
def warm_runs(tmp_path_factory, tiny_models, tiny_prompts) -> LayoutRuns:
    jobs = [{"name": "llama", "model": str(tiny_models["llama"]), "prompts": tiny_prompts,
             "max_tokens": TINY_MAX_TOKENS,
             "logprobs": 20, "ignore_eos": True}]
    return LayoutRuns(tmp_path_factory.mktemp("warm-runs"), jobs, script_args=("--warm-up",))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_rank_warms_up_and_the_layout_still_matches_one_rank(warm_runs, tiny_runs, layout):
    tp, pp = LAYOUTS[layout]
    data = warm_runs.launch(tp, pp)
    # max_model_len 512 and max_batch_size 256 on the CPU: 32 and 255 decodes of 128 and 512 keys
    # with a short chunk, and 32 decodes with a chunk of 512 tokens (the prefill kernel's shortest)
    assert data["warm_ups"] == [[5]] * (tp * pp), data["warm_ups"]
    ref = tiny_runs.get(1, 1)["llama"]
    for i, (r, g) in enumerate(zip(ref, data["results"]["llama"], strict=True)):
        where = f"{layout} prompt {i}"
        assert g["token_ids"] == r["token_ids"], where
        assert_top_logprobs_close(r["logprobs"], g["logprobs"], LOGPROB_TOL, where)
