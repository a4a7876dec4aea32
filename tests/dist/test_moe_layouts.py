"""Expert-parallel layouts of MoE models give the single-rank results.

Random-weight Mixtral (top-2, renormalised) and Qwen2-MoE (shared expert, a dense layer, biases)
run a batch of prompts under mpiexec at:

    tp2-ep2      tp=2, moe_ep=2 (each rank 4 whole experts)
    tp2-ep1      tp=2, moe_ep=1 (moe_tp=2: every rank half of every expert)
    tp4-ep4      tp=4, moe_ep=4 (2 experts per rank)
    tp4-ep2      tp=4, moe_ep=2 (moe_tp=2 x moe_ep=2: 4 experts per rank, each halved)
    tp2-ep2-pp2  tp=2, moe_ep=2 over 2 pipeline stages

Greedy tokens must equal those of the single-rank run (itself held to transformers by
tests/unit/test_moe.py) and the top-20 logprobs agree to fp32 precision. A layout that does not
split the experts fails on every rank before loading, with the numbers in the message.
"""
from __future__ import annotations

import json
import sys

import pytest

from tests.dist.harness import (HERE, assert_top_logprobs_close, assert_world, launch, mpiexec)
from tests.model_factory import make_random_moe_model, random_prompts

pytestmark = pytest.mark.timeout(400)

RUN_MOE_LAYOUT = HERE / "run_moe_layout.py"
MODELS = ("mixtral", "qwen2-moe")
LAYOUTS = {  # name: (tp, pp, moe_ep)
    "tp2-ep2": (2, 1, 2),
    "tp2-ep1": (2, 1, 1),
    "tp4-ep4": (4, 1, 4),
    "tp4-ep2": (4, 1, 2),
    "tp2-ep2-pp2": (2, 2, 2),
}
PROMPT_LENGTHS = (3, 11, 26, 40)
MAX_TOKENS = 8
LOGPROB_TOL = 1e-4  # fp32: the ranks sum partial products in another order


@pytest.fixture(scope="module")
def moe_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-layouts")
    models = {family: make_random_moe_model(root / family, family, seed=11) for family in MODELS}
    prompts = random_prompts(320, PROMPT_LENGTHS, seed=12)
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": [
        {"name": family, "model": str(path), "prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 20}
        for family, path in models.items()]}))
    return root, spec, prompts


class MoeRuns:
    """Each layout launched once per module; rank 0's JSON kept."""

    def __init__(self, root, spec):
        self.root, self.spec = root, spec
        self._cache: dict[str, dict | str] = {}

    def get(self, name: str) -> dict:
        if name not in self._cache:
            try:
                self._cache[name] = self._run(name)
            except BaseException as exc:  # later tests of this layout fail at once, without relaunching
                self._cache[name] = str(exc)
                raise
        cached = self._cache[name]
        if isinstance(cached, str):
            pytest.fail(f"the {name} launch failed in an earlier test:\n{cached}")
        return cached

    def _run(self, name: str) -> dict:
        tp, pp, ep = LAYOUTS.get(name, (1, 1, None))
        out = self.root / f"{name}.json"
        args = ["--spec", str(self.spec), "--out", str(out), "--tp", str(tp), "--pp", str(pp)]
        if ep is not None:
            args += ["--ep", str(ep)]
        num_ranks = tp * pp
        if num_ranks == 1:  # the reference: a plain process, no mpiexec
            result = launch([sys.executable, str(RUN_MOE_LAYOUT), *args], timeout_s=120)
        else:
            result = mpiexec(num_ranks, args, timeout_s=180, script=RUN_MOE_LAYOUT)
        assert result.returncode == 0, result.describe()
        assert_world(result, num_ranks)
        data = json.loads(out.read_text())
        assert data["world_size"] == num_ranks and data["ranks"] == list(range(num_ranks)), data
        return data


@pytest.fixture(scope="module")
def moe_runs(moe_spec) -> MoeRuns:
    root, spec, _ = moe_spec
    return MoeRuns(root, spec)


def test_single_rank_reference_is_greedy_and_not_degenerate(moe_runs, moe_spec):
    for family in MODELS:
        results = moe_runs.get("single")["results"][family]
        for out in results:
            assert len(out["token_ids"]) == MAX_TOKENS
            for token, top in zip(out["token_ids"], out["logprobs"]):
                assert max(top, key=top.get) == str(token)
        assert len({tuple(out["token_ids"]) for out in results}) == len(results), family


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_layout_matches_single_rank(moe_runs, moe_spec, layout):
    prompts = moe_spec[2]
    got_all = moe_runs.get(layout)["results"]
    for family in MODELS:
        ref, got = moe_runs.get("single")["results"][family], got_all[family]
        assert len(got) == len(prompts)
        for i, (r, g) in enumerate(zip(ref, got)):
            where = f"{family} {layout} prompt {i} ({len(prompts[i])} tokens)"
            assert g["token_ids"] == r["token_ids"], where
            assert_top_logprobs_close(r["logprobs"], g["logprobs"], LOGPROB_TOL, where)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moe_groups_follow_the_mapping(moe_runs, layout):
    """Rank r's ep group is the moe_ep ranks of its moe_tp slice, its moe_tp group the other slices'
    ranks of the same experts (tp fastest, then pp; ep fastest inside the TP group)."""
    tp, pp, ep = LAYOUTS[layout]
    groups = moe_runs.get(layout)["groups"]
    assert len(groups) == tp * pp
    for rank, g in enumerate(groups):
        base, tp_rank = rank - rank % tp, rank % tp
        ep_members = [base + (tp_rank // ep) * ep + i for i in range(ep)]
        moe_tp_members = [base + tp_rank % ep + i * ep for i in range(tp // ep)]
        assert g["ep"] == ep_members and g["moe_tp"] == moe_tp_members, (rank, g)
        assert g["ep_sum"] == sum(ep_members) and g["moe_tp_sum"] == sum(moe_tp_members), (rank, g)


def test_experts_not_divisible_by_ep_fail_before_loading(tmp_path):
    """6 experts over moe_ep=4: every rank stops in the layout check, naming the numbers."""
    path = make_random_moe_model(tmp_path / "m", "mixtral", seed=0, num_local_experts=6, num_hidden_layers=1)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"jobs": [{"name": "m", "model": str(path), "prompts": [[5, 6]], "max_tokens": 2}]}))
    result = mpiexec(4, ["--spec", str(spec), "--out", str(tmp_path / "out.json"), "--tp", "4", "--ep", "4"],
                     timeout_s=120, script=RUN_MOE_LAYOUT)
    assert_world(result, 4)
    assert result.returncode != 0, result.describe()
    errors = [line for line in result.stderr.splitlines() if line.startswith("ValueError")]
    assert errors, result.describe()
    assert "moe_ep=4" in errors[0] and "num_experts=6" in errors[0] and "tp=4" in errors[0], errors[0]
    assert "engine.py" not in result.stderr, result.describe()  # no rank got as far as building its engine
