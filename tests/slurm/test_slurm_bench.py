"""slurm/bench.sbatch on a real single-node Slurm, both ways: the offline throughput benchmark on
two ranks, and a two-rank server benchmarked over HTTP from the batch shell, then stopped."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.slurm.cluster import free_port

MESHLM = Path(sys.executable).parent / "meshlm"
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not MESHLM.exists(), reason=f"no meshlm command beside {sys.executable}")]

ENGINE_ARGS = "--num-kv-blocks 64 --max-model-len 256"
WORKLOAD = "--num-prompts 8 --input-len 16 --output-len 4 --warmup 1"
TWO_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"]


def bench_env(model_dir: Path, report: Path, **extra: str) -> dict[str, str]:
    return {"MESHLM": str(MESHLM), "MESHLM_MODEL": str(model_dir), "MESHLM_DEVICE": "cpu",
            "MESHLM_BENCH_JSON": str(report), **extra}


def assert_all_requests_done(report: dict, num_gpus: int) -> None:
    assert (report["num_requests"], report["completed"], report["failed"]) == (8, 8, 0), report
    assert report["total_output_tokens"] == 8 * 4, report  # greedy, ignore_eos: exactly output_len each
    assert report["config"]["num_gpus"] == num_gpus, report["config"]


def test_bench_throughput_job(slurm, slurm_llama, tmp_path):
    report = tmp_path / "throughput.json"
    job = slurm.sbatch("bench.sbatch", [], bench_env(slurm_llama, report, MESHLM_ARGS=f"{ENGINE_ARGS} {WORKLOAD}"),
                       TWO_TASKS)
    slurm.wait_until_done(job, 180)
    assert slurm.job_state(job) == ("COMPLETED", "0:0"), job.log()
    data = json.loads(report.read_text())
    assert_all_requests_done(data, num_gpus=2)
    assert (data["config"]["tp"], data["config"]["pp"]) == (2, 1), data["config"]


def test_bench_serve_job_stops_its_server(slurm, slurm_llama, tmp_path):
    report = tmp_path / "serve.json"
    env = bench_env(slurm_llama, report, MESHLM_BENCH="serve", MESHLM_PORT=str(free_port()),
                    MESHLM_ARGS=ENGINE_ARGS, MESHLM_BENCH_ARGS=f"{WORKLOAD} --vocab-size 320")
    job = slurm.sbatch("bench.sbatch", [], env, TWO_TASKS)
    slurm.wait_until_done(job, 180)
    assert slurm.job_state(job) == ("COMPLETED", "0:0"), job.log()
    assert_all_requests_done(json.loads(report.read_text()), num_gpus=2)
    assert "[meshlm rank 0 tp 0/2]" in job.stderr() and "server stopped" in job.stderr(), job.log()
