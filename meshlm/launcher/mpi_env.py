"""Keep the MPI traffic of a one-node job on the loopback interface.

MPICH (the pip wheel) talks between ranks through UCX by default, or libfabric with
``MPIR_CVAR_CH4_NETMOD=ofi``; left alone, both listen on the host's network address even when
every rank is on one host. ``UCX_NET_DEVICES=lo`` and ``FI_TCP_IFACE=lo`` make them listen on
127.0.0.1 only (checked with ``ss -ltnp`` during a 3-rank job). They are set only for a job on one
node, and only where the user has not set them.
"""
from __future__ import annotations

import os

from meshlm.launcher import env

LOOPBACK_ENV = {"UCX_NET_DEVICES": "lo", "FI_TCP_IFACE": "lo"}

# mpiexec/mpirun flags (MPICH's hydra and Open MPI) that place ranks on other hosts.
_HOST_FLAGS = ("-host", "-hosts", "--host", "-H", "-f", "-hostfile", "--hostfile", "-machinefile",
               "--machinefile", "-machine")


def loopback_env(mpiexec_args: list[str]) -> dict[str, str]:
    """The variables a relaunch on this host adds: empty when the ranks may land on other nodes.

    ``mpiexec_args`` are the user's extra mpiexec arguments (MESHLM_MPIEXEC_ARGS). Inside a Slurm
    or PBS allocation of several nodes, hydra spreads the ranks over them by itself.
    """
    if any(arg.split("=")[0] in _HOST_FLAGS for arg in mpiexec_args):
        return {}
    if _allocation_nodes() > 1:
        return {}
    named = " ".join(mpiexec_args)
    return {name: value for name, value in LOOPBACK_ENV.items()
            if env.get(name) is None and name not in named}


def _allocation_nodes() -> int:
    if env.get("PBS_NODEFILE"):
        return 2  # hydra reads the node file; count it as several
    try:
        return int(env.get("SLURM_JOB_NUM_NODES") or "1")
    except ValueError:
        return 2


def mpiexec_env_args(variables: dict[str, str], is_open_mpi: bool) -> list[str]:
    """``variables`` as mpiexec arguments that set them in every rank."""
    if is_open_mpi:
        return [arg for name, value in variables.items() for arg in ("-x", f"{name}={value}")]
    return [arg for name, value in variables.items() for arg in ("-genv", name, value)]


def set_loopback_before_mpi_init() -> None:
    """Inside an mpiexec job whose ranks all run on this host, choose loopback for MPI itself.

    Hydra tells each rank the job's size (PMI_SIZE) and how many ranks share its node
    (MPI_LOCALNRANKS). Has an effect only before MPI is initialised (before mpi4py.MPI is
    imported); a relaunch sets the variables on mpiexec's command line instead.
    """
    size, local = env.get("PMI_SIZE"), env.get("MPI_LOCALNRANKS")
    if size is None or size != local:
        return
    for name, value in LOOPBACK_ENV.items():
        if env.get(name) is None:
            os.environ[name] = value
