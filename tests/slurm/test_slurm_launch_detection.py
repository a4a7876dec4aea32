"""How the launcher tells a task of an srun step from a plain process, without Slurm or MPI.

A task of a several-task step with no PMI variables (``srun --mpi=none``, or a plugin the MPI
library cannot read) must not relaunch itself under mpiexec: each task would start its own job,
inside the step, and hang waiting for resources. It goes on to init_world, which fails with advice.
"""
from __future__ import annotations

import pytest

from meshlm.launcher import world

_LAUNCHER_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_STEP_ID", "SLURM_NTASKS")


@pytest.fixture
def clean_env(monkeypatch):
    for name in _LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, expected", [
    ({}, False),                                                  # a plain process
    ({"SLURM_NTASKS": "4"}, False),                               # the batch script of an sbatch -n 4 job
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, False),         # srun -n 1: may relaunch, as plain
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}, True),          # srun -n 4 --mpi=none
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "PMI_RANK": "2"}, True),  # srun --mpi=pmi2
    ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "many"}, False),      # unreadable: as outside Slurm
])
def test_srun_tasks_count_as_launched(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert world.launched_by_mpi() is expected
