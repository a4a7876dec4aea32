"""How ranks come to exist and find each other.

The world comes from MPI (mpi4py), so mpirun, mpiexec and srun --mpi=pmi2|pmix all work. The
node-local rank (from a COMM_TYPE_SHARED split) picks the GPU. Every rank learns the rank table
(rank, host, pid of each rank) and opens a lifeline to rank 0 (monitor.py), so that the job's last
words name a rank that died or stopped answering. An uncaught exception on any rank aborts the
whole job, and watchdogs bound communicator set-up, loading and every step, so one dead or stalled
rank never leaves the others hanging.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from meshlm.launcher import env
from meshlm.launcher.monitor import RankMonitor
from meshlm.launcher.mpi_env import loopback_env, mpiexec_env_args, set_loopback_before_mpi_init
from meshlm.launcher.ranks import RankInfo, gather_rank_table

log = logging.getLogger("meshlm")

# Seconds between writing an aborting rank's message and MPI_Abort (see abort_job).
_ABORT_GRACE_S = 1.0
# A rank other than 0 whose phase overran waits this much longer for rank 0 to name the culprit.
_DEFER_S = 5.0

# Variables that the common launchers set in every rank they start.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")


@dataclass(frozen=True, slots=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    comm: object  # mpi4py.MPI.Comm (COMM_WORLD)
    table: tuple[RankInfo, ...] = ()  # every rank's host and pid, in rank order
    monitor: RankMonitor | None = None  # this rank's lifeline to rank 0 (several ranks only)


_STARTED: dict[str, World] = {}  # the process's world, once init_world has run (MPI_Init is once)


def launched_by_mpi() -> bool:
    """True when an MPI launcher (or srun) started this process; checked without initialising MPI.

    A task of a several-task ``srun`` step counts even without PMI variables: ``srun --mpi=none``
    (or a plugin the MPI library cannot use) sets none, and relaunching each task under mpiexec
    would start one job per task. Such a task goes on to ``init_world``, which sees the world of 1
    and fails with advice. A lone ``srun -n 1`` task is left to relaunch, as a plain process.
    """
    if any(name in os.environ for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")):
        return True
    return _srun_tasks() > 1


def _srun_tasks() -> int:
    """Tasks of the srun step this process belongs to; 0 outside a step or when unreadable."""
    if env.get("SLURM_STEP_ID") is None:
        return 0
    try:
        return int(env.get("SLURM_NTASKS") or "0")
    except ValueError:
        return 0


def init_world() -> World:
    """Initialise MPI (once) and read this process's place in the world.

    Collective the first time: gathers the rank table and connects the lifelines to rank 0.
    """
    if "world" in _STARTED:
        return _STARTED["world"]
    if "mpi4py.MPI" not in sys.modules:
        set_loopback_before_mpi_init()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    world = World(comm.Get_rank(), comm.Get_size(), node.Get_rank(), node.Get_size(), comm)
    node.Free()
    slurm_ntasks = _srun_tasks()
    if slurm_ntasks > 1 and world.size == 1:
        raise RuntimeError(
            f"srun started {slurm_ntasks} tasks but MPI sees a world of 1: each task is its own "
            "MPI job. The MPI library and srun's --mpi plugin do not match; use --mpi=pmi2 with "
            "MPICH, --mpi=pmix with Open MPI, or launch with mpiexec inside the allocation")
    if world.size > 1:
        world = _with_rank_table(world)
    install_abort_on_error(world)
    _STARTED["world"] = world
    return world


def _with_rank_table(world: World) -> World:
    """Gather the rank table (rank 0 logs it) and start this rank's monitor."""
    table = gather_rank_table(world.comm)
    if world.rank == 0:  # the other ranks log their own entry once their logging is set up
        log.info("%d ranks: %s", world.size, ", ".join(str(info) for info in table))
    started: list[World] = []
    monitor = RankMonitor.start(world.comm, table, on_death=lambda: abort_job(started[0], 4))
    started.append(World(world.rank, world.size, world.local_rank, world.local_size, world.comm, table,
                         monitor))
    return started[0]


def once_per_node(world: World, produce: Callable[[], object]):
    """Run ``produce`` on the first rank of each node while the node's other ranks wait; every rank
    of the node returns its JSON-able result (lists for tuples), or raises its error (as
    ValueError, FileNotFoundError or RuntimeError, with the first rank's message).

    Collective over the world (every rank calls it). For work that one process per node must do,
    e.g. fetching a model into a cache the node's ranks share. The answer travels as JSON.
    """
    from mpi4py import MPI

    from meshlm.launcher.mpi_json import bcast_json
    errors = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, RuntimeError)}
    node = world.comm.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
    try:
        answer = None
        if node.Get_rank() == 0:
            try:
                answer = {"value": produce()}
            except Exception as exc:  # the node's other ranks raise it too
                kind = type(exc).__name__ if type(exc).__name__ in errors else "RuntimeError"
                message = str(exc) if kind == type(exc).__name__ else f"{type(exc).__name__}: {exc}"
                answer = {"error": [kind, message]}
        answer = bcast_json(node, answer)
    finally:
        node.Free()
    if "error" in answer:
        kind, message = answer["error"]
        raise errors[kind](message)
    return answer["value"]


def install_abort_on_error(world: World) -> None:
    """An uncaught exception on any rank (any thread) logs the rank and aborts the whole job."""
    if world.size == 1:
        return

    def abort(exc_type, exc, tb):
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[meshlm rank {world.rank}] fatal error, aborting all {world.size} ranks:\n{text}")
        abort_job(world, 1)

    sys.excepthook = abort
    threading.excepthook = lambda args: abort(args.exc_type, args.exc_value, args.exc_traceback)


def abort_job(world: World, code: int) -> None:
    """Flush this rank's output, give the launcher time to forward it, then abort every rank.

    MPI_Abort makes the launcher kill all ranks at once; without the pause, Hydra sometimes tears
    down before it has copied the aborting rank's last lines, and the job ends with no message.
    """
    if world.monitor is not None:
        world.monitor.announce_abort()  # the peers will not report this rank's end as a death
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(_ABORT_GRACE_S)
    world.comm.Abort(code)


def end_job_after_error(code: int) -> None:
    """A rank that stops on an error it reported takes the other ranks down with it.

    Without this, a rank that returns normally would leave its peers blocked in a collective.
    A no-op outside a multi-rank MPI world.
    """
    if "mpi4py.MPI" not in sys.modules:
        return
    from mpi4py import MPI
    if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
        if "world" in _STARTED and _STARTED["world"].monitor is not None:
            _STARTED["world"].monitor.announce_abort()
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(_ABORT_GRACE_S)
        MPI.COMM_WORLD.Abort(code)


def count_gpus() -> int:
    """GPUs on this node, asked of the CUDA driver through cuda-python before torch touches CUDA.

    0 when cuda-python or a driver is missing.
    """
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            return 0
    err, = driver.cuInit(0)[:1]
    if int(err) != 0:
        return 0
    err, count = driver.cuDeviceGetCount()
    return int(count) if int(err) == 0 else 0


def check_gpus_per_node(world: World, device: str | None) -> None:
    """More ranks on a node than GPUs fails clearly (CUDA runs only)."""
    if device == "cpu":
        return
    gpus = count_gpus()
    if gpus == 0:
        return
    if world.local_size > gpus:
        raise RuntimeError(f"{world.local_size} ranks run on this node but it has {gpus} GPUs; "
                           "start one rank per GPU")


def mpiexec_path() -> str:
    explicit = env.get("MESHLM_MPIEXEC")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    raise FileNotFoundError(f"no mpiexec beside {sys.executable}; set MESHLM_MPIEXEC to the mpiexec of "
                            "the MPI library that mpi4py uses")


def mpiexec_command(num_ranks: int, argv: list[str]) -> list[str]:
    """``mpiexec -n N <argv>`` with the user's extra arguments (MESHLM_MPIEXEC_ARGS).

    A job on this node alone keeps MPI's traffic on the loopback interface (mpi_env.py). Under
    MPICH's hydra the automatic clean-up is off: when a rank dies, hydra would kill the others
    within milliseconds, before rank 0 could name the dead rank; instead rank 0's monitor names it
    and ends the job (MPI_Abort), and a rank that loses rank 0 does the same (monitor.py).
    Without that clean-up hydra takes every rank's normal exit for a death too, so the ranks are
    told to leave one host after another (MESHLM_ORDERED_EXIT, monitor.py).
    """
    extra = shlex.split(env.get("MESHLM_MPIEXEC_ARGS") or "")
    launcher = mpiexec_path()
    is_open_mpi = _is_open_mpi(launcher)
    if os.geteuid() == 0 and is_open_mpi:
        extra = ["--allow-run-as-root", "--oversubscribe", *extra]
    if not is_open_mpi:
        extra = ["-disable-auto-cleanup", "-genv", "MESHLM_ORDERED_EXIT", "1", *extra]
    loopback = mpiexec_env_args(loopback_env(extra), is_open_mpi)
    return [launcher, "-n", str(num_ranks), *loopback, *extra, *argv]


def _is_open_mpi(launcher: str) -> bool:
    try:
        out = subprocess.run([launcher, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def relaunch_under_mpiexec(num_ranks: int) -> None:
    """Replace this plain process by ``mpiexec -n num_ranks`` running the same command."""
    cmd = mpiexec_command(num_ranks, [sys.executable, "-m", "meshlm", *sys.argv[1:]])
    log.info("starting %d ranks: %s", num_ranks, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


class PhaseWatchdog:
    """Aborts the job when a phase (communicator set-up, loading, a step) overruns on this rank.

    A rank blocked in a collective whose peer died or stalled never returns from the phase. When
    the phase has run for ``timeout_s``, the watchdog names the phase and, from the monitor, the
    ranks that did not arrive or stopped answering, then aborts every rank. Rank 0 hears from
    every rank and so speaks first; another rank waits a little longer (up to _DEFER_S) for rank 0
    to do so, unless rank 0 itself stopped answering.
    """

    def __init__(self, world: World, timeout_s: float):
        self.world = world
        self.timeout_s = timeout_s
        self._phase: tuple[str, int, float] | None = None  # (name, index, start)
        self._index = 0
        if world.size > 1 and self.timeout_s > 0:
            threading.Thread(target=self._watch, name="meshlm-watchdog", daemon=True).start()

    def begin(self, name: str) -> None:
        monitor = self.world.monitor
        self._index = monitor.begin(name) if monitor is not None else self._index + 1
        self._phase = (name, self._index, time.monotonic())

    def end(self) -> None:
        self._phase = None
        if self.world.monitor is not None:
            self.world.monitor.end()

    @contextmanager
    def phase(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            phase = self._phase
            if phase is not None and time.monotonic() - phase[2] > self.timeout_s + self._defer_s():
                name, index, _ = phase
                lines = [f"[meshlm rank {self.world.rank}] {name} has not finished after "
                         f"{self.timeout_s:.0f} s; aborting all {self.world.size} ranks\n"]
                if self.world.monitor is not None:
                    lines += [f"[meshlm rank {self.world.rank}] {line}\n"
                              for line in self.world.monitor.describe_stall(index, name)]
                sys.stderr.write("".join(lines))
                abort_job(self.world, 3)

    def _defer_s(self) -> float:
        monitor = self.world.monitor
        if self.world.rank == 0 or monitor is None or not monitor.is_answering(0):
            return 0.0
        return min(_DEFER_S, self.timeout_s)


class StepWatchdog:
    """The step loops' watchdog: each ``begin`` starts the next step, timed by MESHLM_STEP_TIMEOUT_S."""

    def __init__(self, world: World, timeout_s: float | None = None):
        timeout_s = timeout_s if timeout_s is not None else env.get_int("MESHLM_STEP_TIMEOUT_S")
        self._phases = PhaseWatchdog(world, timeout_s)
        self._step = 0

    @property
    def timeout_s(self) -> float:
        return self._phases.timeout_s

    def begin(self) -> None:
        self._step += 1
        self._phases.begin(f"step {self._step}")

    def end(self) -> None:
        self._phases.end()
