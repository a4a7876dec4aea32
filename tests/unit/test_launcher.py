"""Launcher pieces that need no MPI world: the environment table, the mpiexec command line, the
abort-on-error hook and the step watchdog (with a stand-in communicator), and the EngineArgs
round trip through the command line that a relaunch under mpiexec relies on."""
from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest

import meshlm
from meshlm.launcher import env, world
from meshlm.launcher.world import World
from meshlm.config import EngineArgs
from meshlm.config import CacheConfig, ParallelConfig, SchedulerConfig

pytestmark = pytest.mark.timeout(60)

PACKAGE_DIR = Path(meshlm.__file__).parent

# What a relaunch on one node adds to mpiexec's command line (see mpi_env.py), written out.
LOOPBACK_HYDRA = ["-genv", "UCX_NET_DEVICES", "lo", "-genv", "FI_TCP_IFACE", "lo"]
LOOPBACK_OPEN_MPI = ["-x", "UCX_NET_DEVICES=lo", "-x", "FI_TCP_IFACE=lo"]
# What a relaunch under hydra adds: no clean-up of its own, and the ranks leave in order (monitor.py).
HYDRA_NO_CLEANUP = ["-disable-auto-cleanup", "-genv", "MESHLM_ORDERED_EXIT", "1"]


@pytest.fixture(autouse=True)
def one_node(monkeypatch):
    """No allocation of several nodes and no user choice of MPI's network, unless a test sets one."""
    for name in ("UCX_NET_DEVICES", "FI_TCP_IFACE", "SLURM_JOB_NUM_NODES", "PBS_NODEFILE", "PMI_SIZE",
                 "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)


# --- the environment table ---------------------------------------------------------------------
def test_every_meshlm_variable_in_the_package_is_in_the_table():
    named = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        named |= set(re.findall(r"\bMESHLM_[A-Z0-9_]+\b", path.read_text()))
    assert named, "no MESHLM_ variable found: the scan is broken"
    assert named <= set(env.ENV_TABLE), f"not in ENV_TABLE: {sorted(named - set(env.ENV_TABLE))}"


def test_only_the_env_module_reads_meshlm_variables():
    """Other modules ask env.get(...); none reads os.environ for a MESHLM_ setting itself."""
    read = re.compile(r"os\.(environ\.get|getenv|environ\[)\(?\s*[\"']MESHLM_")
    offenders = [str(p.relative_to(PACKAGE_DIR)) for p in PACKAGE_DIR.rglob("*.py")
                 if p != PACKAGE_DIR / "launcher" / "env.py" and read.search(p.read_text())]
    assert offenders == []


def test_table_entries_are_documented():
    for name, var in env.ENV_TABLE.items():
        assert var.name == name and var.help.strip(), name


def test_get_returns_the_default_or_the_set_value(monkeypatch):
    monkeypatch.delenv("MESHLM_STEP_TIMEOUT_S", raising=False)
    assert env.get("MESHLM_STEP_TIMEOUT_S") == env.ENV_TABLE["MESHLM_STEP_TIMEOUT_S"].default
    monkeypatch.setenv("MESHLM_STEP_TIMEOUT_S", "17")
    assert env.get_int("MESHLM_STEP_TIMEOUT_S") == 17


def test_get_int_names_the_variable_and_value(monkeypatch):
    monkeypatch.setenv("MESHLM_STEP_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match=r"MESHLM_STEP_TIMEOUT_S='soon'"):
        env.get_int("MESHLM_STEP_TIMEOUT_S")


def test_unknown_variable_is_a_key_error():
    with pytest.raises(KeyError):
        env.get("MESHLM_NOT_A_SETTING")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MESHLM_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert env.cache_dir() == tmp_path / "home" / ".cache" / "meshlm"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.cache_dir() == tmp_path / "xdg" / "meshlm"
    monkeypatch.setenv("MESHLM_CACHE_DIR", str(tmp_path / "explicit"))
    assert env.cache_dir() == tmp_path / "explicit"


# --- how ranks come to exist ---------------------------------------------------------------------
@pytest.mark.parametrize("var", ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"])
def test_launched_by_mpi_reads_the_launchers_variables(monkeypatch, var):
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not world.launched_by_mpi()
    monkeypatch.setenv(var, "0")
    assert world.launched_by_mpi()


def _fake_launcher(path: Path, version_text: str) -> Path:
    """An executable that prints ``version_text`` for --version, like mpiexec does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version_text}'\n")
    path.chmod(0o755)
    return path


def test_mpiexec_path_prefers_the_variable(monkeypatch):
    monkeypatch.setenv("MESHLM_MPIEXEC", "/opt/mpi/bin/mpirun")
    assert world.mpiexec_path() == "/opt/mpi/bin/mpirun"


def test_mpiexec_path_beside_the_interpreter(monkeypatch, tmp_path):
    monkeypatch.delenv("MESHLM_MPIEXEC", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(FileNotFoundError, match="MESHLM_MPIEXEC"):
        world.mpiexec_path()
    launcher = _fake_launcher(tmp_path / "bin" / "mpiexec", "HYDRA build details:")
    assert world.mpiexec_path() == str(launcher)


def test_mpiexec_command_with_extra_args(monkeypatch, tmp_path):
    launcher = _fake_launcher(tmp_path / "mpiexec", "HYDRA build details:")
    monkeypatch.setenv("MESHLM_MPIEXEC", str(launcher))
    monkeypatch.setenv("MESHLM_MPIEXEC_ARGS", "-bind-to none -genv FOO 'a b'")
    monkeypatch.setattr(world.os, "geteuid", lambda: 0)
    assert world.mpiexec_command(3, ["python", "-m", "x"]) == [
        str(launcher), "-n", "3", *LOOPBACK_HYDRA, *HYDRA_NO_CLEANUP, "-bind-to", "none", "-genv", "FOO",
        "a b", "python", "-m", "x"]


@pytest.mark.parametrize("euid, extra", [(0, ["--allow-run-as-root", "--oversubscribe"]), (1000, [])])
def test_open_mpi_as_root_gets_its_flags(monkeypatch, tmp_path, euid, extra):
    launcher = _fake_launcher(tmp_path / "mpirun", "mpiexec (Open MPI) 5.0.3")
    monkeypatch.setenv("MESHLM_MPIEXEC", str(launcher))
    monkeypatch.delenv("MESHLM_MPIEXEC_ARGS", raising=False)
    monkeypatch.setattr(world.os, "geteuid", lambda: euid)
    assert world.mpiexec_command(2, ["prog"]) == [str(launcher), "-n", "2", *LOOPBACK_OPEN_MPI, *extra, "prog"]


def test_relaunch_runs_the_same_command_under_mpiexec(monkeypatch, tmp_path):
    launcher = _fake_launcher(tmp_path / "mpiexec", "HYDRA build details:")
    monkeypatch.setenv("MESHLM_MPIEXEC", str(launcher))
    monkeypatch.delenv("MESHLM_MPIEXEC_ARGS", raising=False)
    monkeypatch.setattr(sys, "argv", ["meshlm", "generate", "Hello", "--tp", "2"])
    calls = []

    def fake_execv(path, argv):
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(world.os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        world.relaunch_under_mpiexec(2)
    cmd = [str(launcher), "-n", "2", *LOOPBACK_HYDRA, *HYDRA_NO_CLEANUP, sys.executable, "-m", "meshlm",
           "generate", "Hello", "--tp", "2"]
    assert calls == [(str(launcher), cmd)]


# --- aborting the job ----------------------------------------------------------------------------
class FakeComm:
    """Records Abort calls instead of ending the process."""

    def __init__(self):
        self.aborts: list[int] = []
        self.aborted = threading.Event()

    def Abort(self, code: int) -> None:  # noqa: N802 (the mpi4py name)
        self.aborts.append(code)
        self.aborted.set()


@pytest.fixture
def no_grace(monkeypatch):
    monkeypatch.setattr(world, "_ABORT_GRACE_S", 0.0)


def test_uncaught_exception_names_the_rank_and_aborts(monkeypatch, capsys, no_grace):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    comm = FakeComm()
    world.install_abort_on_error(World(rank=3, size=4, local_rank=3, local_size=4, comm=comm))
    try:
        raise RuntimeError("boom on purpose")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "[meshlm rank 3] fatal error, aborting all 4 ranks" in err
    assert "RuntimeError: boom on purpose" in err
    assert comm.aborts == [1]


def test_one_rank_keeps_the_default_hook(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    before = sys.excepthook
    world.install_abort_on_error(World(rank=0, size=1, local_rank=0, local_size=1, comm=FakeComm()))
    assert sys.excepthook is before


def test_watchdog_aborts_a_step_that_overruns(capsys, no_grace):
    comm = FakeComm()
    watchdog = world.StepWatchdog(World(rank=1, size=2, local_rank=1, local_size=2, comm=comm), timeout_s=0.2)
    watchdog.begin()
    watchdog.end()
    watchdog.begin()  # step 2 never ends
    try:
        assert comm.aborted.wait(timeout=10), "the watchdog did not fire"
    finally:
        watchdog.end()
    assert comm.aborts[0] == 3
    assert "[meshlm rank 1] step 2 has not finished after 0 s" in capsys.readouterr().err


def test_watchdog_leaves_finished_steps_alone(no_grace):
    comm = FakeComm()
    watchdog = world.StepWatchdog(World(rank=0, size=2, local_rank=0, local_size=2, comm=comm), timeout_s=0.3)
    deadline = time.monotonic() + 1.0  # about 4 of the watchdog's checks
    while time.monotonic() < deadline:
        watchdog.begin()
        watchdog.end()
    assert comm.aborts == []


def test_watchdog_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MESHLM_STEP_TIMEOUT_S", "42")
    watchdog = world.StepWatchdog(World(rank=0, size=1, local_rank=0, local_size=1, comm=FakeComm()))
    assert watchdog.timeout_s == 42


# --- EngineArgs through the command line ---------------------------------------------------------
def _parse(argv: list[str]) -> EngineArgs:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli(parser.parse_args(argv))


NON_DEFAULT = EngineArgs(
    model="/models/tiny", revision="v2", download_dir="/models/hub", tensor_parallel_size=4,
    pipeline_parallel_size=2, moe_expert_parallel_size=2,
    dtype="bfloat16", device="cpu", seed=7, block_size=32, num_kv_blocks=100, gpu_memory_utilization=0.5,
    cpu_kv_cache_gb=0.25, enable_prefix_caching=False, max_num_tokens=1024, max_batch_size=8,
    max_model_len=2048, capacity_scheduler_policy="guaranteed_no_evict", attention_backend="reference",
    load_format="random", skip_tokenizer_init=True,
    enable_cuda_graphs=False, enable_fused_kernels=True, async_scheduling=False, kv_cache_dtype="fp8",
    speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2},
    quantization="fp8", hf_overrides={"quantization_config": {"quant_method": "fp8", "ignored_layers": ["lm_head"]}})


def test_non_default_covers_every_field():
    """A new EngineArgs field must join NON_DEFAULT, so the round trip covers it."""
    defaults = EngineArgs()
    assert [f.name for f in fields(EngineArgs) if getattr(NON_DEFAULT, f.name) == getattr(defaults, f.name)] == []


def test_to_cli_round_trip():
    assert _parse(NON_DEFAULT.to_cli()) == NON_DEFAULT


def test_defaults_give_an_empty_command_line():
    assert EngineArgs().to_cli() == []
    assert _parse([]) == EngineArgs()


def test_generate_command_line_round_trip():
    """The relaunched `meshlm generate` parses what to_cli wrote, next to its own --seed."""
    from meshlm.cli import build_parser
    ns = build_parser().parse_args(["generate", "Hello", "--seed", "3", *NON_DEFAULT.to_cli()])
    assert EngineArgs.from_cli(ns) == NON_DEFAULT
    assert ns.sample_seed == 3


def test_short_flags_and_boolean_flags():
    args = _parse(["--tp", "2", "--pp", "3", "--ep", "2", "--no-enable-prefix-caching", "--engine-seed", "5"])
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.moe_expert_parallel_size) == (2, 3, 2)
    assert args.enable_prefix_caching is False and args.seed == 5
    assert EngineArgs(enable_prefix_caching=False).to_cli() == ["--no-enable-prefix-caching"]


def test_engine_defaults_come_from_the_config_classes():
    cache, sched, par = CacheConfig(), SchedulerConfig(), ParallelConfig()
    args = EngineArgs()
    assert (args.block_size, args.num_kv_blocks, args.gpu_memory_utilization, args.cpu_kv_cache_gb,
            args.enable_prefix_caching) == (cache.block_size, cache.num_blocks, cache.gpu_memory_utilization,
                                            cache.cpu_kv_cache_gb, cache.enable_prefix_caching)
    assert (args.max_num_tokens, args.max_batch_size, args.max_model_len) == (
        sched.max_num_tokens, sched.max_batch_size, sched.max_model_len)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.moe_expert_parallel_size) == (
        par.tensor_parallel_size, par.pipeline_parallel_size, par.moe_expert_parallel_size)


def test_invalid_engine_args_name_the_values():
    with pytest.raises(ValueError, match=r"moe_expert_parallel_size=3.*tensor_parallel_size=4"):
        EngineArgs(tensor_parallel_size=4, moe_expert_parallel_size=3)
    with pytest.raises(ValueError, match="block_size=24"):
        _parse(["--block-size", "24"])
