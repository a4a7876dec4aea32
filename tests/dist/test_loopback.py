"""A job on one node keeps MPI's traffic on the loopback interface (launcher/mpi_env.py).

Started the way ``meshlm serve --tp 3`` starts its ranks (``mpiexec_command``), every rank listens
on 127.0.0.1 only; with the user's own choice of network (UCX_NET_DEVICES), meshlm leaves it alone.
"""
from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

import pytest

from tests.dist.harness import launch, rank_env

pytest.importorskip("psutil")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
SCRIPT = Path(__file__).resolve().parent / "run_listen_addresses.py"
pytestmark = [pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"),
              pytest.mark.timeout(120)]


def _addresses(monkeypatch, **env) -> dict[int, set[str]]:
    from meshlm.launcher.world import mpiexec_command
    monkeypatch.setenv("MESHLM_MPIEXEC", str(MPIEXEC))
    for name in ("UCX_NET_DEVICES", "FI_TCP_IFACE", "MESHLM_MPIEXEC_ARGS", "SLURM_JOB_NUM_NODES", "PBS_NODEFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = launch(mpiexec_command(3, [sys.executable, str(SCRIPT)]), timeout_s=90, env=rank_env(**env))
    assert result.returncode == 0, result.describe()
    found = {int(r): set(a.split(",")) - {""} for r, n, a in
             re.findall(r"\[listen\] rank (\d) of (\d) addresses ([0-9a-f.:,]*)", result.stdout) if n == "3"}
    assert set(found) == {0, 1, 2}, result.describe()
    return found


def _host_addresses() -> set[str]:
    import psutil
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")}


def test_one_node_job_listens_on_loopback_only(monkeypatch):
    for rank, addresses in _addresses(monkeypatch).items():
        assert addresses and addresses <= {"127.0.0.1"}, (rank, addresses)


def test_the_users_choice_of_network_is_kept(monkeypatch):
    host = _host_addresses()
    if not host:
        pytest.skip("this host has no address besides loopback")
    found = _addresses(monkeypatch, UCX_NET_DEVICES="all")
    assert any(addresses & host for addresses in found.values()), (found, host)
