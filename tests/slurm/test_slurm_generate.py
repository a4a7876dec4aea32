"""slurm/generate.sbatch submitted as it is, to a real single-node Slurm, ranks started by srun.

The tp=2 and tp=2 x pp=2 jobs print the single-rank run's answer token for token, and every rank
logs its coordinates in a world of the right size. With ``srun --mpi=none`` (a plugin the mpich
wheel cannot use) each task is its own world of 1: the job fails, every task naming the mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.slurm.reference import (GENERATE_ARGS, PROMPT, assert_same_tokens, expected_rank_coordinates,
                                   logged_rank_coordinates)

MESHLM = Path(sys.executable).parent / "meshlm"
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not MESHLM.exists(), reason=f"no meshlm command beside {sys.executable}")]

JOB_TIMEOUT_S = 180


def generate_env(model_dir: Path, **extra: str) -> dict[str, str]:
    """The job's variables: this checkout's meshlm on the CPU, the tiny model, a short answer."""
    return {"MESHLM": str(MESHLM), "MESHLM_MODEL": str(model_dir), "MESHLM_ARGS": GENERATE_ARGS,
            "MESHLM_DEVICE": "cpu", "MESHLM_LOG_ALL_RANKS": "1", **extra}


def node_options(tasks_per_node: int, nodes: int = 1) -> list[str]:
    return [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={tasks_per_node}"]


@pytest.mark.parametrize("tasks, tp, pp", [(2, 2, 1), (4, 2, 2)], ids=["tp2", "tp2-pp2"])
def test_generate_job_matches_single_rank(slurm, slurm_llama, slurm_llama_reference, tasks, tp, pp):
    env = generate_env(slurm_llama, **({"MESHLM_TP": str(tp)} if pp > 1 else {}))
    job = slurm.sbatch("generate.sbatch", [PROMPT], env, node_options(tasks))
    slurm.wait_until_done(job, JOB_TIMEOUT_S)
    assert slurm.job_state(job) == ("COMPLETED", "0:0"), job.log()
    log = job.stderr()
    assert f"{tasks} tasks, tp={tp} pp={pp}, srun --mpi=pmi2" in log, job.log()
    # --gpus-per-node reached the job: the node's placeholder GPUs, all of them, none trimmed.
    assert f"CUDA_VISIBLE_DEVICES={','.join(map(str, range(tasks)))}" in log, job.log()
    # One line per rank, each with the coordinates of a tp x pp world: N singletons would all
    # log "rank 0" and fail the layout check.
    assert sorted(logged_rank_coordinates(log)) == sorted(expected_rank_coordinates(tp, pp)), job.log()
    assert_same_tokens(slurm_llama, slurm_llama_reference, job.stdout().strip(), f"tp={tp} pp={pp}\n{job.log()}")


def test_layout_that_does_not_fill_the_job_fails_before_srun(slurm, slurm_llama):
    job = slurm.sbatch("generate.sbatch", [PROMPT], generate_env(slurm_llama, MESHLM_TP="2", MESHLM_PP="2"),
                       node_options(2))
    slurm.wait_until_done(job, 60)
    assert slurm.job_state(job) == ("FAILED", "2:0"), job.log()
    assert "tp=2 x pp=2 is 4 ranks, but the job has 2 tasks on 1 nodes" in job.stderr(), job.log()


def test_srun_mpi_none_fails_naming_the_mismatch(slurm, slurm_llama):
    job = slurm.sbatch("generate.sbatch", [PROMPT], generate_env(slurm_llama, MESHLM_SRUN_MPI="none"),
                       node_options(2))
    slurm.wait_until_done(job, 90)
    state, _ = slurm.job_state(job)
    log = job.stderr()
    assert state == "FAILED", job.log()
    assert log.count("srun started 2 tasks but MPI sees a world of 1") == 2, job.log()  # each task says so
    assert "--mpi=pmi2 with MPICH" in log, job.log()
    assert "starting 2 ranks" not in log, job.log()  # no task relaunched itself under mpiexec
    assert job.stdout().strip() == "", job.log()
