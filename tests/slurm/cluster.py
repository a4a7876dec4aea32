"""A throw-away Slurm for the tests, started by the repository's own scripts/slurm-up.sh.

    cluster = start_cluster(cluster_dir())                  # installs slurm-wlm + munge if missing
    job = cluster.sbatch("generate.sbatch", ["w5 w17"], env={"MESHLM_DEVICE": "cpu"},
                         options=["--ntasks-per-node=2", "--gpus-per-node=2"])
    cluster.wait_until_done(job, timeout_s=120)             # polls squeue with a deadline
    cluster.job_state(job), job.log()
    stop_cluster(cluster)                                   # scripts/slurm-down.sh, folder removed

Every command has a timeout; a wait that runs out fails the test with the job's log. Client
commands go through ``exec_prefix`` (empty here; a network namespace for the simulated hosts).
"""
from __future__ import annotations

import random
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.dist.harness import rank_env

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SLURM_DIR = REPO_ROOT / "slurm"
SLURM_UP = REPO_ROOT / "scripts" / "slurm-up.sh"
SLURM_DOWN = REPO_ROOT / "scripts" / "slurm-down.sh"
PLACEHOLDER_GPUS = 4  # per node: enough for the 4-task job on one node
_UNAVAILABLE = 3  # slurm-up.sh: slurm-wlm/munge cannot be installed here


# Slurm's mpi/pmi2 plugin reads a PMI-1 request with a single read() of at most 1024 bytes (a
# "TODO: read until newline" in its agent.c), and MPICH speaks PMI-1 to it by default (its PMI-2
# client fails MPI_Init against this plugin). MPICH's UCX address puts measured 600 to 850 bytes
# here, and now and then longer: the line is then cut, and MPI_Init fails on every node with this
# message before meshlm runs anything. A job that fails so is the launcher's bug, not meshlm's.
SLURM_PMI1_CUT_LINE = "mpi/pmi2: value not properly terminated in client request"


@dataclass(slots=True)
class Job:
    job_id: int
    out_path: Path  # the job's stdout: rank 0's answer
    err_path: Path  # the job's stderr: every rank's log, srun's messages

    def stdout(self) -> str:
        return _read(self.out_path)

    def stderr(self) -> str:
        return _read(self.err_path)

    def log(self) -> str:
        return f"--- job {self.job_id} stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def hit_pmi1_cut_line(self) -> bool:
        """MPI_Init failed on Slurm's cut PMI-1 line (SLURM_PMI1_CUT_LINE)."""
        return SLURM_PMI1_CUT_LINE in self.stderr()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass(slots=True)
class SlurmCluster:
    root: Path
    exec_prefix: list[str] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, **extra: str) -> dict[str, str]:
        """A job's environment: the CPU rank environment of the dist tests, this cluster's config."""
        return rank_env(SLURM_CONF=str(self.conf), **extra)

    def run(self, cmd: list[str], timeout_s: float = 30, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        # A prefix is a remote shell (ssh-like): it takes the command as one quoted line.
        argv = [*self.exec_prefix, shlex.join(cmd)] if self.exec_prefix else cmd
        try:
            result = subprocess.run(argv, env=env or self.env(), capture_output=True,
                                    text=True, timeout=timeout_s, cwd=self.root)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd)} did not return within {timeout_s} s")
        if check and result.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sbatch(self, script: str, args: list[str], env: dict[str, str], options: list[str]) -> Job:
        """Submit ``slurm/<script>`` as it is in the repository; ``env`` is exported to the job."""
        log_dir = self.root / "jobs"
        log_dir.mkdir(exist_ok=True)
        out = self.run(["sbatch", "--parsable", f"--output={log_dir}/%j.out", f"--error={log_dir}/%j.err",
                        f"--chdir={log_dir}", *options, str(SLURM_DIR / script), *args], env=self.env(**env))
        job_id = int(out.stdout.strip().split(";")[0])
        return Job(job_id, log_dir / f"{job_id}.out", log_dir / f"{job_id}.err")

    def is_queued(self, job: Job) -> bool:
        """True while squeue lists the job (pending, running or completing)."""
        out = self.run(["squeue", "-h", "-j", str(job.job_id), "-o", "%T"], check=False)
        return bool(out.stdout.strip())

    def wait_until_done(self, job: Job, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.is_queued(job):
            if time.monotonic() > deadline:
                self.run(["scancel", str(job.job_id)], check=False)
                pytest.fail(f"job {job.job_id} still queued after {timeout_s} s; cancelled\n{job.log()[-6000:]}")
            time.sleep(0.3)

    def job_state(self, job: Job) -> tuple[str, str]:
        """(JobState, ExitCode) from ``scontrol show job`` (no accounting database here)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job.job_id)]).stdout
        state = re.search(r"JobState=(\S+)", out).group(1)
        exit_code = re.search(r"\bExitCode=(\S+)", out).group(1)
        return state, exit_code


def free_port() -> int:
    """A TCP port for a daemon or server of the tests that binds here now, drawn below the kernel's
    ephemeral range. The simulated hosts' namespaces (tests/multinode) hold ephemeral ports that a
    check here cannot see (MPI's listeners, the connections of earlier jobs): a port from that range
    once met one of them and hosta's slurmd could not bind. Nothing takes a port below the range
    unless asked for it by number."""
    low = _lowest_ephemeral_port()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _GIVEN_PORTS:  # the daemons of a cluster start after both ports are chosen
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError(f"no free TCP port below {low}")


_GIVEN_PORTS: set[int] = set()


def _lowest_ephemeral_port() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def cluster_dir() -> Path:
    """A fresh folder for a cluster's files. Not pytest's tmp_path: munged wants every folder above
    its socket to be o+x, and pytest's are 0700."""
    root = Path(tempfile.mkdtemp(prefix="meshlm-slurm-"))
    root.chmod(0o755)
    return root


def start_cluster(root: Path, exec_prefix: list[str] | None = None, **settings: str) -> SlurmCluster:
    """``scripts/slurm-up.sh root`` with its settings (SLURM_NODES=..., see the script); skips the
    test when Slurm cannot be installed here."""
    env = rank_env(SLURM_PLACEHOLDER_GPUS=str(PLACEHOLDER_GPUS), SLURM_LOCAL_CPUS="8",
                   SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()), **settings)
    try:
        result = subprocess.run(["bash", str(SLURM_UP), str(root)], env=env, capture_output=True, text=True,
                                timeout=600)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SLURM_DOWN), str(root)], timeout=60)
        pytest.fail("scripts/slurm-up.sh did not finish within 600 s")
    if result.returncode == _UNAVAILABLE:
        pytest.skip(f"no Slurm here: {result.stderr.strip()}")
    if result.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted((root / "log").glob("*.log")))
        subprocess.run(["bash", str(SLURM_DOWN), str(root)], timeout=60)
        pytest.fail(f"scripts/slurm-up.sh exited {result.returncode}:\n{result.stdout}\n{result.stderr}\n{logs}")
    return SlurmCluster(root, exec_prefix or [])


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel what is left, stop the daemons (slurmd, slurmctld, munged), remove the folder."""
    cluster.run(["scancel", "--user", "root"], check=False)
    subprocess.run(["bash", str(SLURM_DOWN), str(cluster.root)], timeout=120)
    shutil.rmtree(cluster.root, ignore_errors=True)


def job_processes(job_id: int) -> list[int]:
    """Live processes that belong to a job: those whose environment has SLURM_JOB_ID=<job_id>."""
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and _state(entry) != "Z":
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def _state(proc_dir: Path) -> str:
    stat = (proc_dir / "stat").read_text()
    return stat[stat.rindex(")") + 2]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.3):
    """Poll ``predicate()`` until it returns something truthy; returns it, or None after the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None

