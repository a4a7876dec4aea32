"""A job never hangs: a wrong world size, a killed rank, a rank that raises, a stalled or stopped
rank and a rank that hangs while loading each end every rank promptly with a non-zero exit and a
message that names the rank at fault, with its host and pid.

Faults are injected by the rank script (run_layout.py ``--fault``), inside rank 1's N-th step or
while it loads.
"""
from __future__ import annotations

import json
import re
import socket

import pytest

from tests.dist.harness import assert_world, mpiexec, rank_env
from tests.dist.proc_tree import wait_until_gone

pytestmark = pytest.mark.timeout(180)

FAULT_STEP = 4  # well inside the generation: prefill is step 1, then one decode step per token
MAX_END_S = 30.0  # from mpiexec's start to its exit, start-up included


@pytest.fixture(scope="module")
def fault_spec(tmp_path_factory, tiny_models, tiny_prompts):
    """One job long enough that the fault step comes mid-generation."""
    root = tmp_path_factory.mktemp("faults")
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": [{
        "name": "llama", "model": str(tiny_models["llama"]), "prompts": tiny_prompts, "max_tokens": 40,
        "ignore_eos": True}]}))
    return spec, root / "out.json"


def _rank_name(result, rank: int) -> str:
    """How meshlm names ``rank``: its pid as the rank script printed it, and this host."""
    pids = {int(r): int(pid) for r, _, pid in re.findall(r"\[run_layout\] rank (\d+) of (\d+) pid (\d+)",
                                                          result.stdout)}
    return f"rank {rank} (host {socket.gethostname()}, pid {pids[rank]})"


def _run_fault(fault_spec, fault: str, launcher_args: tuple[str, ...] = (), **env):
    spec, out = fault_spec
    return mpiexec(2, ["--spec", str(spec), "--out", str(out), "--tp", "2", "--fault", fault,
                       "--fault-rank", "1", "--fault-step", str(FAULT_STEP)],
                   timeout_s=120, env=rank_env(**env), launcher_args=launcher_args)


def _assert_failed_fast(result) -> None:
    assert_world(result, 2)
    assert "[run_layout rank 1] injecting" in result.stdout, result.describe()  # the fault did fire
    assert result.returncode != 0, result.describe()
    assert result.elapsed_s < MAX_END_S, result.describe()
    assert wait_until_gone(result.reported_pids()) == [], "ranks outlived mpiexec"


def test_world_size_not_tp_times_pp_fails_with_both_numbers(fault_spec):
    spec, out = fault_spec
    result = mpiexec(3, ["--spec", str(spec), "--out", str(out), "--tp", "2"], timeout_s=120)
    assert_world(result, 3)
    assert result.returncode != 0, result.describe()
    errors = [line for line in result.stderr.splitlines() if line.startswith("ValueError")]
    assert errors, result.describe()
    assert re.search(r"\b3\b", errors[0]) and re.search(r"\b2\b", errors[0]), errors[0]  # world 3, tp x pp 2


def test_sigkill_of_a_rank_ends_the_job(fault_spec):
    result = _run_fault(fault_spec, "kill")
    _assert_failed_fast(result)
    # mpiexec (Hydra) reports a killed process and its signal, but not which rank it was.
    assert re.search(r"signal 9|SIGNAL: 9|Killed", result.output), result.describe()


def test_sigkill_of_a_rank_is_named_when_the_launcher_leaves_the_ending_to_meshlm(fault_spec):
    """With hydra's automatic clean-up off (as meshlm's own relaunch runs it), nothing races rank 0:
    it sees rank 1's lifeline close, names it, and ends the job itself."""
    result = _run_fault(fault_spec, "kill", launcher_args=("-disable-auto-cleanup",))
    _assert_failed_fast(result)
    assert f"[meshlm rank 0] {_rank_name(result, 1)} died" in result.stderr, result.describe()


def test_exception_on_a_rank_aborts_the_job_naming_it(fault_spec):
    result = _run_fault(fault_spec, "raise")
    _assert_failed_fast(result)
    assert "[meshlm rank 1] fatal error" in result.stderr, result.describe()
    assert f"RuntimeError: injected failure at step {FAULT_STEP}" in result.stderr, result.describe()


def test_stalled_rank_is_ended_by_the_watchdog(fault_spec):
    timeout_s = 2
    result = _run_fault(fault_spec, "stall", MESHLM_STEP_TIMEOUT_S=str(timeout_s))
    _assert_failed_fast(result)
    reports = re.findall(rf"\[meshlm rank (\d+)\] step (\d+) has not finished after {timeout_s} s",
                         result.stderr)
    assert reports, result.describe()
    # Rank 1 sleeps inside the step; rank 0 waits for it in the same step's all-reduce. Either
    # watchdog may fire first, and both name themselves and the step.
    assert {int(rank) for rank, _ in reports} <= {0, 1}, reports
    assert {int(step) for _, step in reports} == {FAULT_STEP}, reports


def test_stopped_rank_is_named_by_the_watchdog(fault_spec):
    result = _run_fault(fault_spec, "stop", MESHLM_STEP_TIMEOUT_S="3")
    _assert_failed_fast(result)
    assert f"[meshlm rank 0] step {FAULT_STEP} has not finished after 3 s" in result.stderr, result.describe()
    # Rank 1 is frozen by SIGSTOP: it sends no heartbeat, and the kernel says it is stopped.
    assert f"[meshlm rank 0] {_rank_name(result, 1)} stopped answering (stopped by a signal)" in result.stderr, (
        result.describe())
    assert "rank 0 (host" not in result.stderr.split("has not finished")[1], result.describe()


def test_rank_that_hangs_while_loading_is_named(fault_spec):
    result = _run_fault(fault_spec, "stall-loading", MESHLM_SETUP_TIMEOUT_S="3")
    assert_world(result, 2)
    assert "[run_layout rank 1] injecting stall-loading" in result.stdout, result.describe()
    assert result.returncode != 0 and result.elapsed_s < MAX_END_S, result.describe()
    # Rank 0 loaded and waits for rank 1 in the next phase; rank 1 never left loading.
    assert "[meshlm rank 0] sizing the KV cache has not finished after 3 s" in result.stderr, result.describe()
    assert (f"[meshlm rank 0] {_rank_name(result, 1)} has not arrived at sizing the KV cache: it is inside "
            "loading weights") in result.stderr, result.describe()
    assert wait_until_gone(result.reported_pids()) == [], "ranks outlived mpiexec"
