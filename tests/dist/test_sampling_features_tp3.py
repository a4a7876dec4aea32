"""logit_bias, allowed_token_ids, bad_words and prompt_logprobs on the default model at tp=3 under
mpiexec (through AsyncLLM, in one launch) equal the single-rank run."""
from __future__ import annotations

import sys

import pytest

from tests.dist.harness import HERE, assert_world, launch, mpiexec, rank_env

pytestmark = pytest.mark.timeout(400)

LOGPROB_TOL = 5e-4  # 30 layers of fp32 sums in another order
SCRIPT = HERE / "run_sampling_features.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, default_model) -> tuple[dict, dict]:
    import json
    root = tmp_path_factory.mktemp("sampling-features")
    single = launch([sys.executable, str(SCRIPT), "--model", str(default_model), "--out", str(root / "tp1.json")],
                    timeout_s=240, env=rank_env())
    assert single.returncode == 0, single.describe()
    result = mpiexec(3, ["--model", str(default_model), "--out", str(root / "tp3.json"), "--tp", "3"],
                     timeout_s=300, script=SCRIPT)
    assert result.returncode == 0, result.describe()
    assert_world(result, 3)
    return json.loads((root / "tp1.json").read_text()), json.loads((root / "tp3.json").read_text())


def _close(ref, got, name: str) -> None:
    assert (ref is None) == (got is None), name
    for pos, (r, g) in enumerate(zip(ref or [], got or [])):
        assert (r is None) == (g is None), (name, pos)
        if r is None:
            continue
        r, g = dict((int(t), lp) for t, lp in r), dict((int(t), lp) for t, lp in g)
        first = next(iter(r))
        assert next(iter(g)) == first, (name, pos)  # the same sampled (or prompt) token first
        for token in set(r) & set(g):
            assert abs(r[token] - g[token]) < LOGPROB_TOL, (name, pos, token, r[token], g[token])


@pytest.mark.parametrize("name", ["plain", "logit_bias", "allowed_token_ids", "bad_words", "prompt_logprobs"])
def test_tp3_equals_one_rank(runs, name):
    ref, got = runs[0][name], runs[1][name]
    assert got["token_ids"] == ref["token_ids"], name
    _close(ref["logprobs"], got["logprobs"], name)
    _close(ref["prompt_logprobs"], got["prompt_logprobs"], name)


def test_the_features_change_the_output(runs):
    """The reference itself shows each feature at work (so equal outputs mean something)."""
    ref = runs[0]
    plain = ref["plain"]["token_ids"]
    assert ref["logit_bias"]["token_ids"] != plain and 253 not in ref["logit_bias"]["token_ids"]
    assert set(ref["allowed_token_ids"]["token_ids"]) <= {28, 30, 253, 260, 314, 341}
    assert 504 in plain and 504 not in ref["bad_words"]["token_ids"]  # 504: "The"
    prompt_ids = ref["prompt_logprobs"]["prompt_token_ids"]
    scores = ref["prompt_logprobs"]["prompt_logprobs"]
    assert len(scores) == len(prompt_ids) > 16 and scores[0] is None
    assert [int(e[0][0]) for e in scores[1:]] == prompt_ids[1:]
    assert ref["plain"]["prompt_logprobs"] is None
