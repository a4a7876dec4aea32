"""How the distributed tests launch ranks: real ``mpiexec`` on the CPU (MPI backend).

Every launch has a timeout and, when it runs out, the whole process tree (mpiexec, Hydra's proxy,
the ranks) is killed, so no test can hang or leave ranks behind. ``LayoutRuns`` runs each layout
once per session, since several tests compare the same launches.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dist.proc_tree import kill_tree

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
# The mpiexec of the MPI library mpi4py uses: beside the interpreter (the mpich wheel's, a system
# Python's), unless MESHLM_MPIEXEC names it (as meshlm's own relaunch reads it).
MPIEXEC = Path(os.environ.get("MESHLM_MPIEXEC") or Path(sys.executable).parent / "mpiexec")
RUN_LAYOUT = HERE / "run_layout.py"

# The random-weight models every layout runs. "qwen2-kv1" has 4 query heads over one KV head, so
# at tp=2 the KV head is replicated; the others have 2 KV heads, split one per rank.
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),  # 3 layers: pp=2 splits them unevenly (2 + 1)
    "qwen3": ("qwen3", {}),  # head_dim 24 != hidden / heads, qk-norm
    "qwen2-kv1": ("qwen2", {"num_key_value_heads": 1}),  # attention biases
}
PROMPT_LENGTHS = (3, 11, 26, 40)  # one and several KV blocks of 16, prefill of mixed lengths
TINY_MAX_TOKENS = 8
CHAT_PROMPT = "What is the capital of France?"
DEFAULT_MAX_TOKENS = 16

_RANK_LINE = re.compile(r"\[run_layout\] rank (\d+) of (\d+) pid (\d+)")

# Variables an MPI launcher sets; a test run under mpiexec itself must not leak them to its launches.
_LAUNCHER_VARS = re.compile(r"^(PMI_|PMIX_|OMPI_|MPI_LOCAL|HYDRA_|SLURM_)")


def _require_mpiexec() -> None:
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (the mpich wheel provides one) and no MESHLM_MPIEXEC")


def rank_env(**extra: str) -> dict[str, str]:
    """The environment of a launch: CPU device, one thread per rank (2 cores serve up to 4 ranks)."""
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARS.match(k)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MESHLM_DEVICE="cpu", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


@dataclass(slots=True)
class Launch:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def describe(self) -> str:
        """The command, its exit code and output, for assertion messages."""
        return (f"command: {' '.join(self.cmd)}\nexit code {self.returncode} after {self.elapsed_s:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}")

    def reported_world(self) -> set[tuple[int, int]]:
        """``(rank, size)`` of every ``[run_layout] rank R of N pid P`` line the rank script printed."""
        return {(int(r), int(n)) for r, n, _ in _RANK_LINE.findall(self.stdout)}

    def reported_pids(self) -> list[int]:
        return [int(pid) for _, _, pid in _RANK_LINE.findall(self.stdout)]


def launch(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> Launch:
    """Run ``cmd`` from the repository root; on timeout kill its whole tree and fail the test."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env or rank_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # an orphaned grandchild still holds the pipes
            stdout, stderr = "", ""
        result = Launch(cmd, proc.returncode, stdout, stderr, time.monotonic() - start)
        pytest.fail(f"no exit within {timeout_s} s; killed\n{result.describe()}")
    return Launch(cmd, proc.returncode, stdout, stderr, time.monotonic() - start)


def mpiexec(num_ranks: int, script_args: list[str], timeout_s: float = 180,
            env: dict[str, str] | None = None, script: Path = RUN_LAYOUT,
            launcher_args: tuple[str, ...] = ()) -> Launch:
    """``mpiexec [launcher_args] -n num_ranks python script ...``."""
    _require_mpiexec()
    return launch([str(MPIEXEC), *launcher_args, "-n", str(num_ranks), sys.executable, str(script), *script_args],
                  timeout_s, env)


def assert_world(result: Launch, num_ranks: int) -> None:
    """Every rank 0..N-1 reported a world of N (N singletons would each report ``rank 0 of 1``)."""
    expected = {(r, num_ranks) for r in range(num_ranks)}
    assert result.reported_world() == expected, (
        f"expected ranks {sorted(expected)} of one world\n{result.describe()}")


# --- layout launches ---------------------------------------------------------------------------
class LayoutRuns:
    """Runs ``run_layout.py`` once per (job set, tp, pp, ep) and keeps rank 0's JSON.

    ``env`` is the launches' environment (default ``rank_env()``: the CPU) and ``script_args`` are
    added to every launch (the GPU tests pass ``--report-runners``).
    """

    def __init__(self, root: Path, jobs: list[dict], env: dict[str, str] | None = None,
                 script_args: tuple[str, ...] = ()):
        self.root = root
        self.spec = root / "spec.json"
        self.spec.write_text(json.dumps({"jobs": jobs}))
        self.env, self.script_args = env, script_args
        self._cache: dict[tuple[int, int, int | None], dict | str] = {}

    def get(self, tp: int, pp: int, ep: int | None = None) -> dict:
        """``{job name: [{"token_ids", "logprobs"} per prompt]}`` of the tp x pp (x moe_ep) launch."""
        return self.launch(tp, pp, ep)["results"]

    def launch(self, tp: int, pp: int, ep: int | None = None) -> dict:
        """Rank 0's whole file for the launch: ``results``, ``world_size``, ``ranks`` (and ``runners``)."""
        key = (tp, pp, ep)
        if key not in self._cache:
            try:
                self._cache[key] = self._run(tp, pp, ep)
            except BaseException as exc:  # later tests of this layout fail at once, without relaunching
                self._cache[key] = str(exc)
                raise
        cached = self._cache[key]
        if isinstance(cached, str):
            pytest.fail(f"the tp={tp} pp={pp} ep={ep} launch failed in an earlier test:\n{cached}")
        return cached

    def _run(self, tp: int, pp: int, ep: int | None) -> dict:
        out = self.root / f"tp{tp}-pp{pp}-ep{ep}.json"
        args = ["--spec", str(self.spec), "--out", str(out), "--tp", str(tp), "--pp", str(pp),
                *(["--ep", str(ep)] if ep is not None else []), *self.script_args]
        num_ranks = tp * pp
        if num_ranks == 1:  # the reference: a plain process, no mpiexec
            result = launch([sys.executable, str(RUN_LAYOUT), *args], timeout_s=180, env=self.env)
        else:
            result = mpiexec(num_ranks, args, timeout_s=240, env=self.env)
        assert result.returncode == 0, result.describe()
        assert_world(result, num_ranks)
        data = json.loads(out.read_text())
        assert data["world_size"] == num_ranks and data["ranks"] == list(range(num_ranks)), data
        return data


# --- comparisons -------------------------------------------------------------------------------
def assert_top_logprobs_close(ref: list[dict[str, float]], got: list[dict[str, float]], tol: float,
                              where: str) -> None:
    """Per generated token, the top-k logprobs agree within ``tol``.

    A token may sit in one list and not the other only at the cut-off (a near-tie with the k-th),
    so it must then lie within ``tol`` of the other list's smallest value.
    """
    assert len(ref) == len(got), f"{where}: {len(ref)} vs {len(got)} logprob entries"
    for step, (r, g) in enumerate(zip(ref, got)):
        assert len(r) == len(g), f"{where} token {step}: {len(r)} vs {len(g)} logprobs"
        for token in r.keys() & g.keys():
            assert abs(r[token] - g[token]) <= tol, (
                f"{where} token {step}: logprob of {token} is {g[token]!r}, single rank {r[token]!r}")
        for token in r.keys() - g.keys():
            assert r[token] <= min(g.values()) + tol, f"{where} token {step}: {token} missing from the top"
        for token in g.keys() - r.keys():
            assert g[token] <= min(r.values()) + tol, f"{where} token {step}: {token} not in the reference top"
