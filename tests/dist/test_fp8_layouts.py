"""FP8 models under tensor and expert parallelism give the single-rank FP8 results.

Published compressed-tensors checkpoints (per-tensor float8 weights, static per-tensor input scales,
so every rank quantizes activations with the same scale) of a random Llama (2 KV heads: split at
tp=2, replicated at tp=4) and a random Mixtral (moe_ep = tp: whole experts per rank, 4 or 2 of 8),
and the Llama quantized at load (per-channel scales, per-token activations), run the same prompts:

    tp2    tp=2 (Mixtral moe_ep=2)
    tp4    tp=4 (Mixtral moe_ep=4)
    tp2 pp2   the Llama jobs whose quantization_config leaves layers unquantized

Those jobs keep all of decoder layer 0 and layer 2's MLP in float32 inside an otherwise FP8 model:
a published checkpoint that stores them so (listed in ``ignore``), and quantizing at load with the
same list given through ``hf_overrides``.

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
STATIC_JOBS = ("llama-ct-static", "mixtral-ct-static", "llama-ct-static-ignoring")
IGNORED = ["model.layers.0", "model.layers.2.mlp"]
IGNORING_JOBS = ("llama-ct-static-ignoring", "llama-at-load-ignoring")


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-layouts")
    prompts = random_prompts(320, PROMPT_LENGTHS, seed=12)
    llama = make_random_model(root / "llama", "llama", seed=11)
    mixtral = make_random_moe_model(root / "mixtral", "mixtral", seed=11)
    common = {"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 20}
    small = make_random_model(root / "llama-small", "llama", seed=11, weight_std=0.05)
    overrides = {"quantization_config": {"quant_method": "fp8", "ignored_layers": IGNORED}}
    jobs = [
        {"name": "llama-ct-static", "model": str(write_fp8_checkpoint(llama, root / "llama-ct", "ct-tensor-static",
                                                                      calibration_prompts=prompts)), **common},
        {"name": "mixtral-ct-static", "model": str(write_fp8_checkpoint(mixtral, root / "mixtral-ct",
                                                                        "ct-tensor-static")), "moe": True, **common},
        {"name": "llama-at-load", "model": str(small), "quantization": "fp8", **common},
        {"name": "llama-ct-static-ignoring", **common, "model": str(write_fp8_checkpoint(
            llama, root / "llama-ct-ignoring", "ct-tensor-static", calibration_prompts=prompts, ignore=IGNORED))},
        {"name": "llama-at-load-ignoring", "model": str(small), "quantization": "fp8", "hf_overrides": overrides,
         **common},
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    (root / "spec-ignoring.json").write_text(json.dumps({"jobs": [j for j in jobs if j["name"] in IGNORING_JOBS]}))
    cache: dict[tuple[int, int], dict] = {}

    def get(tp: int, pp: int = 1) -> dict:
        if (tp, pp) not in cache:
            out = root / f"tp{tp}-pp{pp}.json"
            job_spec = spec if pp == 1 else root / "spec-ignoring.json"
            args = ["--spec", str(job_spec), "--out", str(out), "--tp", str(tp), "--pp", str(pp)]
            size = tp * pp
            result = (launch([sys.executable, str(RUN_FP8_LAYOUT), *args], timeout_s=180) if size == 1
                      else mpiexec(size, args, timeout_s=240, script=RUN_FP8_LAYOUT))
            assert result.returncode == 0, result.describe()
            assert_world(result, size)
            data = json.loads(out.read_text())
            assert data["world_size"] == size and data["ranks"] == list(range(size)), data
            cache[tp, pp] = data["results"]
        return cache[tp, pp]

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
    for job in ("llama-at-load", "llama-at-load-ignoring"):
        ref, got = fp8_runs(1)[job], fp8_runs(tp)[job]
        for i, (r, g) in enumerate(zip(ref, got)):
            where = f"{job} tp={tp} prompt {i} ({PROMPT_LENGTHS[i]} tokens)"
            assert_top_logprobs_close(r["logprobs"][:1], g["logprobs"][:1], PER_TOKEN_TOL, where)


def test_unquantized_layers_under_tensor_and_pipeline_parallelism(fp8_runs):
    """tp=2 x pp=2: the stages build their own layers' quantization from the global layer names."""
    ref, got = fp8_runs(1), fp8_runs(2, 2)
    for i, (r, g) in enumerate(zip(ref["llama-ct-static-ignoring"], got["llama-ct-static-ignoring"])):
        where = f"llama-ct-static-ignoring tp=2 pp=2 prompt {i}"
        assert g["token_ids"] == r["token_ids"], where
        assert_top_logprobs_close(r["logprobs"], g["logprobs"], LOGPROB_TOL, where)
    for i, (r, g) in enumerate(zip(ref["llama-at-load-ignoring"], got["llama-at-load-ignoring"])):
        where = f"llama-at-load-ignoring tp=2 pp=2 prompt {i}"
        assert_top_logprobs_close(r["logprobs"][:1], g["logprobs"][:1], PER_TOKEN_TOL, where)
