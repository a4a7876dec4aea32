"""Tensor, pipeline and expert parallel layouts on several GPUs give the single-GPU results.

Random-weight models (conftest.py) run a batch of prompts of mixed lengths through run_layout.py
on the GPUs: the reference is one plain process on one GPU, each layout an ``mpiexec`` launch.

- fp32 (Llama, and Qwen2 with one KV head, replicated): greedy tokens equal, logprobs within
  FP32_LOGPROB_TOL (the ranks sum partial products in another order; Triton's fp32 dots use tf32
  in both runs alike).
- bf16 (Llama): the first token equal and its logprobs within BF16_LOGPROB_TOL; later tokens may
  part ways after a near-tie that rounding in another order flips.
- Every rank's ModelRunner ran on ``cuda:<local rank>`` with NCCL communicators on its split axes.
- At tp=2 decode steps replay CUDA graphs (which capture the NCCL calls) on every rank, give the
  tokens of the same run without graphs, and the job still exits 0 (the launch asserts it).
- MoE (Mixtral, 8 experts; fp32 and bf16 as above) at tp x ep: tp=2 x ep=2, tp=4 x ep=2
  (moe_tp=2), tp=4 x ep=4.
"""
from __future__ import annotations

import pytest

from tests.dist.harness import LayoutRuns
from tests.gpu_multi.agreement import first_token_failures, greedy_failures, runner_failures
from tests.gpu_multi.gpu_ranks import gpu_env, needs_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

MAX_TOKENS = 8
FP32_LOGPROB_TOL = 1e-3
BF16_LOGPROB_TOL = 0.2  # bf16 keeps ~3 significant digits; a misplaced shard is off by whole units
DENSE_JOBS = {  # name: (model, dtype, CUDA graphs)
    "llama-fp32": ("llama", "float32", True),
    "qwen2-kv1-fp32": ("qwen2-kv1", "float32", True),
    "llama-bf16": ("llama", "bfloat16", True),
    "llama-fp32-eager": ("llama", "float32", False),
}
FP32_JOBS = [name for name, (_, dtype, _) in DENSE_JOBS.items() if dtype == "float32"]
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp4": (4, 1), "tp2-pp2": (2, 2)}
MOE_LAYOUTS = {"tp2-ep2": (2, 2), "tp4-ep2": (4, 2), "tp4-ep4": (4, 4)}  # name: (tp, moe_ep)
LAYOUT_PARAMS = [pytest.param(name, marks=needs_gpus(tp * pp)) for name, (tp, pp) in LAYOUTS.items()]
MOE_PARAMS = [pytest.param(name, marks=needs_gpus(tp)) for name, (tp, _) in MOE_LAYOUTS.items()]


def _job(name: str, model, dtype: str, graphs: bool, prompts) -> dict:
    return {"name": name, "model": str(model), "prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 10,
            "ignore_eos": True, "device": "cuda", "dtype": dtype, "enable_cuda_graphs": graphs}


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory, gpu_models, gpu_prompts) -> LayoutRuns:
    jobs = [_job(name, gpu_models[model], dtype, graphs, gpu_prompts)
            for name, (model, dtype, graphs) in DENSE_JOBS.items()]
    return LayoutRuns(tmp_path_factory.mktemp("gpu-dense"), jobs, env=gpu_env(), script_args=("--report-runners",))


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, gpu_models, gpu_prompts) -> LayoutRuns:
    # fp32 experts take the eager path on CUDA, bf16 ones the grouped GEMM
    jobs = [_job("mixtral-fp32", gpu_models["mixtral"], "float32", True, gpu_prompts),
            _job("mixtral-bf16", gpu_models["mixtral"], "bfloat16", True, gpu_prompts)]
    return LayoutRuns(tmp_path_factory.mktemp("gpu-moe"), jobs, env=gpu_env(), script_args=("--report-runners",))


@needs_gpus(2)
def test_single_gpu_reference_is_greedy_and_not_degenerate(dense_runs, gpu_prompts):
    data = dense_runs.launch(1, 1)
    assert not runner_failures(data["runners"], [0], 1, 1, "SingleRankComm")
    for name in DENSE_JOBS:
        results = data["results"][name]
        assert len(results) == len(gpu_prompts)
        for out in results:
            assert len(out["token_ids"]) == MAX_TOKENS
            for token, top in zip(out["token_ids"], out["logprobs"]):
                assert top[str(token)] == max(top.values()), (name, token, top)  # greedy (ties allowed)
        assert len({tuple(out["token_ids"]) for out in results}) == len(results), name


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
def test_dense_layout_matches_single_gpu(dense_runs, layout):
    tp, pp = LAYOUTS[layout]
    ref, data = dense_runs.get(1, 1), dense_runs.launch(tp, pp)
    failures = runner_failures(data["runners"], list(range(tp * pp)), tp, pp, "NcclComm")
    for name in FP32_JOBS:
        failures += greedy_failures(ref[name], data["results"][name], FP32_LOGPROB_TOL, f"{layout} {name}")
    failures += first_token_failures(ref["llama-bf16"], data["results"]["llama-bf16"], BF16_LOGPROB_TOL,
                                     f"{layout} llama-bf16")
    assert not failures, "\n".join(failures)


@needs_gpus(2)
def test_cuda_graphs_at_tp2_replay_on_every_rank_and_match_eager(dense_runs):
    data = dense_runs.launch(2, 1)
    jobs = list(DENSE_JOBS)
    for rank, records in enumerate(data["runners"]):
        replays = {job: rec["graph_replays"] for job, rec in zip(jobs, records)}
        assert replays["llama-fp32"] > 0 and replays["llama-bf16"] > 0, (rank, replays)
        assert replays["llama-fp32-eager"] == 0, (rank, replays)
    results = data["results"]
    failures = greedy_failures(results["llama-fp32-eager"], results["llama-fp32"], FP32_LOGPROB_TOL, "tp2 graphs")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", MOE_PARAMS)
def test_moe_layout_matches_single_gpu(moe_runs, layout):
    tp, ep = MOE_LAYOUTS[layout]
    ref, data = moe_runs.get(1, 1), moe_runs.launch(tp, 1, ep)
    failures = runner_failures(data["runners"], list(range(tp)), tp, 1, "NcclComm")
    failures += greedy_failures(ref["mixtral-fp32"], data["results"]["mixtral-fp32"], FP32_LOGPROB_TOL,
                                f"{layout} mixtral-fp32")
    failures += first_token_failures(ref["mixtral-bf16"], data["results"]["mixtral-bf16"], BF16_LOGPROB_TOL,
                                     f"{layout} mixtral-bf16")
    # The reference is not degenerate: different prompts, different continuations
    assert len({tuple(out["token_ids"]) for out in ref["mixtral-fp32"]}) == len(ref["mixtral-fp32"])
    assert not failures, "\n".join(failures)
