"""What the multi-GPU tests add to the CPU harness (tests/dist/harness.py): how many GPUs there
are, a skip that names the shortfall, and the environment of a GPU launch.

The launches themselves are the CPU harness's (``launch``, ``mpiexec``, ``LayoutRuns``) with this
environment; the rank scripts choose the device from their job (``"device": "cuda"``).
"""
from __future__ import annotations

import functools
import os
import subprocess
import threading
import time

import pytest

from tests.dist.harness import MPIEXEC, REPO_ROOT, Launch, rank_env
from tests.dist.proc_tree import kill_tree

# NVLink multicast stays off on the lent multi-GPU hosts (NVLS and symmetric-memory multicast).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@functools.cache
def num_gpus() -> int:
    """CUDA devices this process sees (0 without torch's CUDA build or a driver)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int):
    """A mark that skips a test on a machine with fewer than ``n`` GPUs, saying how many it has."""
    have = num_gpus()
    return pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPUs on one host; this machine has {have}")


def gpu_env(**extra: str) -> dict[str, str]:
    """The CPU harness's rank environment with the device left to the job (cuda), multicast off,
    the repository importable by the rank scripts, and Open MPI allowed to start ranks as root
    (the lent GPU machines run commands as root)."""
    env = rank_env(**NO_MULTICAST)
    env.pop("MESHLM_DEVICE", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if is_open_mpi():
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.update(extra)
    return env


@functools.cache
def is_open_mpi() -> bool:
    """Whether the harness's mpiexec is Open MPI's (else MPICH's hydra is assumed)."""
    if not MPIEXEC.exists():
        return False
    try:
        out = subprocess.run([str(MPIEXEC), "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def leave_ending_to_meshlm() -> tuple[str, ...]:
    """mpiexec arguments under which rank 0, not the launcher, ends a job whose rank died: hydra's
    automatic clean-up off (as meshlm's own relaunch runs it). Open MPI needs none: its mpirun
    names the dead rank itself when it ends the job."""
    return () if is_open_mpi() else ("-disable-auto-cleanup",)


def launch_watching(cmd: list[str], timeout_s: float, env: dict[str, str], marker: str) -> tuple[Launch, float | None]:
    """``harness.launch`` that also times the end of the job from the first stdout line holding
    ``marker`` (e.g. a fault being injected): returns the Launch and those seconds (None when the
    marker never came). On timeout the whole process tree is killed and the test fails."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    seen: list[float] = []
    out: list[str] = []
    err: list[str] = []

    def read_stdout():
        for line in proc.stdout:
            if marker in line and not seen:
                seen.append(time.monotonic())
            out.append(line)

    readers = [threading.Thread(target=read_stdout, daemon=True),
               threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait(timeout=30)
    end = time.monotonic()
    for reader in readers:
        reader.join(timeout=30)
    result = Launch(cmd, proc.returncode, "".join(out), "".join(err), end - start)
    if end - start >= timeout_s:
        pytest.fail(f"no exit within {timeout_s} s; killed\n{result.describe()}")
    return result, (end - seen[0]) if seen else None
