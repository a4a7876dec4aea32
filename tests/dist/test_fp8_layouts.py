"""FP8 models under tensor and expert parallelism give the single-rank FP8 results.

Published compressed-tensors checkpoints (per-tensor float8 weights, static per-tensor input scales,
so every rank quantizes activations with the same scale) of a random Llama (2 KV heads: split at
tp=2, replicated at tp=4) and a random Mixtral (moe_ep = tp: whole experts per rank, 4 or 2 of 8),
and the Llama quantized at load (per-channel scales, per-token activations), run the same prompts:

    tp2    tp=2 (Mixtral moe_ep=2)
    tp4    tp=4 (Mixtral moe_ep=4)

Greedy tokens equal those of the single-rank run and the top-20 logprobs agree to float32
precision. With per-token activation scales a row-parallel layer (o_proj, down_proj) quantizes
each rank's slice of a row with that slice's own scale, so the layout run agrees to float8
precision instead: its logprobs after the prompt are compared with a tolerance of that size, on a
model of smaller weights (std 0.05) that amplifies such differences less.
"""
from __future__ import annotations

import json
import sys

import pytest

from tests.dist.harness import HERE, assert_top_logprobs_close, assert_world, launch, mpiexec
from tests.model_factory import make_random_model, make_random_moe_model, random_prompts, write_fp8_checkpoint

pytestmark = pytest.mark.timeout(400)
pytest.importorskip("compressed_tensors")

RUN_FP8_LAYOUT = HERE / "run_fp8_layout.py"
PROMPT_LENGTHS = (3, 11, 26, 40)
MAX_TOKENS = 8
LOGPROB_TOL = 1e-4  # fp32: the ranks sum partial products in another order
PER_TOKEN_TOL = 0.1  # float8 activation scales of half rows instead of whole ones
STATIC_JOBS = ("llama-ct-static", "mixtral-ct-static")


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-layouts")
    prompts = random_prompts(320, PROMPT_LENGTHS, seed=12)
    llama = make_random_model(root / "llama", "llama", seed=11)
    mixtral = make_random_moe_model(root / "mixtral", "mixtral", seed=11)
    common = {"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 20}
    jobs = [
        {"name": "llama-ct-static", "model": str(write_fp8_checkpoint(llama, root / "llama-ct", "ct-tensor-static",
                                                                      calibration_prompts=prompts)), **common},
        {"name": "mixtral-ct-static", "model": str(write_fp8_checkpoint(mixtral, root / "mixtral-ct",
                                                                        "ct-tensor-static")), "moe": True, **common},
        {"name": "llama-at-load", "model": str(make_random_model(root / "llama-small", "llama", seed=11,
                                                                 weight_std=0.05)), "quantization": "fp8", **common},
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    cache: dict[int, dict] = {}

    def get(tp: int) -> dict:
        if tp not in cache:
            out = root / f"tp{tp}.json"
            args = ["--spec", str(spec), "--out", str(out), "--tp", str(tp)]
            result = (launch([sys.executable, str(RUN_FP8_LAYOUT), *args], timeout_s=180) if tp == 1
                      else mpiexec(tp, args, timeout_s=240, script=RUN_FP8_LAYOUT))
            assert result.returncode == 0, result.describe()
            assert_world(result, tp)
            data = json.loads(out.read_text())
            assert data["world_size"] == tp and data["ranks"] == list(range(tp)), data
            cache[tp] = data["results"]
        return cache[tp]

    return get


@pytest.mark.parametrize("tp", [2, 4])
def test_static_scale_checkpoints_match_the_single_rank_run(fp8_runs, tp):
    for job in STATIC_JOBS:
        ref, got = fp8_runs(1)[job], fp8_runs(tp)[job]
        assert len(got) == len(PROMPT_LENGTHS)
        for i, (r, g) in enumerate(zip(ref, got)):
            where = f"{job} tp={tp} prompt {i} ({PROMPT_LENGTHS[i]} tokens)"
            assert g["token_ids"] == r["token_ids"], where
            assert_top_logprobs_close(r["logprobs"], g["logprobs"], LOGPROB_TOL, where)


@pytest.mark.parametrize("tp", [2, 4])
def test_quantized_at_load_matches_the_single_rank_run_to_fp8_precision(fp8_runs, tp):
    ref, got = fp8_runs(1)["llama-at-load"], fp8_runs(tp)["llama-at-load"]
    for i, (r, g) in enumerate(zip(ref, got)):
        where = f"llama-at-load tp={tp} prompt {i} ({PROMPT_LENGTHS[i]} tokens)"
        assert_top_logprobs_close(r["logprobs"][:1], g["logprobs"][:1], PER_TOKEN_TOL, where)
