"""An fp8 KV cache at tp=2 gives the single-rank fp8 run's tokens and logprobs.

The models: Llama with per-head KV-cache scales in its checkpoint (tp=2 splits its 2 KV heads, so
each rank must take its own head's scale), and Qwen2 with one KV head (replicated on both ranks);
each in a roomy pool and in a small one where chunked prefill and preemption happen.
"""
from __future__ import annotations

import shutil

import pytest

from tests.dist.harness import TINY_MAX_TOKENS, LayoutRuns, assert_top_logprobs_close

pytestmark = pytest.mark.timeout(300)

# fp32 ranks sum partial products in another order (~1e-6); a key or value that lands that close
# to an e4m3 rounding midpoint rounds the other way on one side, one e4m3 step (up to 1/8 of it)
# apart, which moves later logprobs by up to a few 1e-3 on these small models (1.4e-3 seen). The
# fp8 pool itself moves them by more than 0.05 (the last test).
LOGPROB_TOL = 5e-3
SMALL_POOL = {"num_kv_blocks": 20, "block_size": 4, "max_model_len": 80, "max_num_tokens": 24}
K_SCALES = [0.02, 0.005]  # per KV head: the second clamps the largest keys
V_SCALE = 0.03


def _with_kv_scales(src, dst):
    """A copy of the model ``src`` with per-head key scales and a per-tensor value scale."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    path = shutil.copytree(src, dst)
    num_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    tensors = load_file(path / "model.safetensors")
    for layer in range(num_layers):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(K_SCALES)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor([V_SCALE])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory, tiny_models, tiny_prompts) -> LayoutRuns:
    root = tmp_path_factory.mktemp("fp8-kv-runs")
    models = {"llama-scaled": _with_kv_scales(tiny_models["llama"], root / "llama-scaled"),
              "qwen2-kv1": tiny_models["qwen2-kv1"]}
    jobs = [{"name": f"{name}-{pool}", "model": str(path), "prompts": tiny_prompts, "max_tokens": TINY_MAX_TOKENS,
             "logprobs": 20, "ignore_eos": True, "kv_cache_dtype": "fp8", **engine}
            for name, path in models.items() for pool, engine in (("roomy", {}), ("small", SMALL_POOL))]
    jobs.append({"name": "llama-scaled-auto", "model": str(models["llama-scaled"]), "prompts": tiny_prompts,
                 "max_tokens": TINY_MAX_TOKENS, "logprobs": 20, "ignore_eos": True})
    return LayoutRuns(root, jobs)


@pytest.mark.parametrize("job", ["llama-scaled-roomy", "llama-scaled-small", "qwen2-kv1-roomy", "qwen2-kv1-small"])
def test_fp8_kv_at_tp2_matches_single_rank(fp8_runs, tiny_prompts, job):
    ref, got = fp8_runs.get(1, 1)[job], fp8_runs.get(2, 1)[job]
    assert len(got) == len(tiny_prompts)
    for i, (r, g) in enumerate(zip(ref, got)):
        where = f"{job} prompt {i} ({len(tiny_prompts[i])} tokens)"
        assert g["token_ids"] == r["token_ids"], where
        assert_top_logprobs_close(r["logprobs"], g["logprobs"], LOGPROB_TOL, where)


def test_the_scales_and_the_pool_change_the_result(fp8_runs):
    """The comparison above can fail: the fp8 run with the checkpoint's scales is not the fp32 one."""
    fp8, full = fp8_runs.get(1, 1)["llama-scaled-roomy"], fp8_runs.get(1, 1)["llama-scaled-auto"]
    worst = max(abs(f_step[t] - a_step[t])
                for f, a in zip(fp8, full) for f_step, a_step in zip(f["logprobs"], a["logprobs"])
                for t in f_step.keys() & a_step.keys())
    assert worst > 10 * LOGPROB_TOL
