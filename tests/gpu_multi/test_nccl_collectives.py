"""The NCCL backend on several GPUs of one host, against the MPI backend on the same tensors.

``run_collectives.py`` runs under ``mpiexec -n N`` (N = 2 and 4): each rank must take
``cuda:<node-local rank>`` (a GPU no other rank holds), every named collective (all-reduce over TP,
the experts' combine, the logits gather to the sampler, the sampled tokens' broadcast, the
pipeline hand-off by send/recv) must give through NCCL what it gives through MPI, and after
destroying its communicators every rank must exit 0 by itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist.harness import assert_world, mpiexec
from tests.dist.proc_tree import wait_until_gone
from tests.gpu_multi.agreement import collective_failures
from tests.gpu_multi.gpu_ranks import gpu_env, needs_gpus

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]

RUN_COLLECTIVES = Path(__file__).resolve().parent / "run_collectives.py"
# Integer-valued 16-bit and int64 tensors sum exactly in any order; fp32 sums of normal values
# differ by rounding only (NCCL's ring against MPI's order).
TOLERANCES = {"float32": 1e-5, "bfloat16": 0.0, "int64": 0.0}
MAX_RUN_S = 120.0  # start-up (CUDA, NCCL) included
RANK_COUNTS = [pytest.param(2, marks=needs_gpus(2)), pytest.param(4, marks=needs_gpus(4))]


@pytest.fixture(scope="module")
def collective_runs(tmp_path_factory):
    root, runs = tmp_path_factory.mktemp("collectives"), {}

    def run(num_ranks: int):
        if num_ranks not in runs:
            out = root / f"n{num_ranks}.json"
            result = mpiexec(num_ranks, ["--out", str(out)], timeout_s=240, env=gpu_env(),
                             script=RUN_COLLECTIVES)
            runs[num_ranks] = (result, json.loads(out.read_text()) if result.returncode == 0 else None)
        return runs[num_ranks]
    return run


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_ranks_exit_by_themselves_after_destroying_nccl(collective_runs, num_ranks):
    result, data = collective_runs(num_ranks)
    assert result.returncode == 0, result.describe()
    assert_world(result, num_ranks)
    assert result.elapsed_s < MAX_RUN_S, result.describe()
    assert wait_until_gone(result.reported_pids()) == [], "ranks outlived mpiexec"
    assert data["world_size"] == num_ranks and data["ranks"] == list(range(num_ranks)), data


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_each_rank_takes_its_node_local_gpu(collective_runs, num_ranks):
    result, data = collective_runs(num_ranks)
    assert data is not None, result.describe()
    devices = data["devices"]
    for rank, d in enumerate(devices):
        assert d["rank"] == rank and d["local_rank"] == rank, d  # one host: local rank = world rank
        assert d["device"] == f"cuda:{rank}" and d["current_device"] == rank, d
    assert len({d["uuid"] for d in devices}) == num_ranks, devices  # no two ranks share a GPU


@pytest.mark.parametrize("num_ranks", RANK_COUNTS)
def test_nccl_collectives_match_mpi(collective_runs, num_ranks):
    result, data = collective_runs(num_ranks)
    assert data is not None, result.describe()
    checks = data["checks"]
    names = {c["name"] for c in checks}
    assert names == {"all_reduce_tp", "combine_from_experts", "gather_logits_to_sampler", "all_gather_dim0",
                     "broadcast_sampled_tokens", "broadcast_from_last", "pipeline_hand_off"}, names
    assert {c["rank"] for c in checks} == set(range(num_ranks))
    # The sampler (TP rank 0) gets the gathered logits, the other ranks None, on both backends.
    gathered = [c for c in checks if c["name"] == "gather_logits_to_sampler" and c["layout"] == f"tp{num_ranks}-pp1"]
    assert [c["nccl_shape"] for c in gathered] == [[5, 40 * num_ranks]] + [None] * (num_ranks - 1), gathered
    failures = collective_failures(checks, TOLERANCES)
    assert not failures, "\n".join(failures)
