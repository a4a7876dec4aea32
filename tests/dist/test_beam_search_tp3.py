"""Beam search and n > 1 samples (the prompt's KV blocks forked, copy-on-write on every rank) on
the default model at tp=3 under mpiexec give the single-rank run's beams and samples."""
from __future__ import annotations

import json

import pytest

from tests.dist.harness import HERE, assert_world, mpiexec

pytestmark = pytest.mark.timeout(600)

SCRIPT = HERE / "run_beam_search.py"
LOGPROB_TOL = 5e-4  # 30 layers of fp32 sums in another order


def run(tmp_path, default_model, num_ranks: int) -> dict:
    out = tmp_path / f"tp{num_ranks}.json"
    result = mpiexec(num_ranks, ["--model", str(default_model), "--out", str(out), "--tp", str(num_ranks)],
                     timeout_s=400, script=SCRIPT)
    assert result.returncode == 0, result.describe()
    assert_world(result, num_ranks)
    return json.loads(out.read_text())


def test_tp3_beams_and_forked_samples_match_one_rank(tmp_path, default_model):
    ref = run(tmp_path, default_model, 1)
    got = run(tmp_path, default_model, 3)
    for run_ in (ref, got):
        assert run_["free_blocks"] == run_["num_blocks"]  # every block came back
    assert [[b["tokens"] for b in beams] for beams in got["beams"]] == \
        [[b["tokens"] for b in beams] for beams in ref["beams"]]
    for got_beams, ref_beams in zip(got["beams"], ref["beams"]):
        for g, r in zip(got_beams, ref_beams):
            assert g["text"] == r["text"]
            assert g["cum_logprob"] == pytest.approx(r["cum_logprob"], abs=LOGPROB_TOL)
    assert "Paris" in ref["beams"][0][0]["text"]
    assert got["samples"] == ref["samples"]
