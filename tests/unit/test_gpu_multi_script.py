"""benchmarks/run_gpu_multi.sh on the CPU, with stand-ins for nvidia-smi, mpirun and the Python
interpreter that log their arguments: which parts run which tests, which layouts and all-reduce
sizes a machine of N GPUs gets, and the refusal of an unknown part."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "run_gpu_multi.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# Each stand-in appends its name and arguments to $CALLS; the Python one writes {} to any --out file.
_STAND_IN = """#!/usr/bin/env bash
echo "{name} $*" >> "$CALLS"
{extra}
"""
_WRITE_OUT = 'prev=""; for a in "$@"; do [ "$prev" = --out ] && echo {} > "$a"; prev=$a; done; echo "1 passed in 0.1s"'


def _run(tmp_path: Path, part: str, num_gpus: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(exist_ok=True)
    gpus = "; ".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'" for i in range(num_gpus)) or "true"
    # mpirun's stand-in runs the command it is given once (the stand-in Python only logs)
    run_command = 'while [ $# -gt 0 ] && [ "$1" != python3 ]; do shift; done; "$@"'
    for name, extra in (("nvidia-smi", gpus), ("mpirun", run_command), ("mpiexec", "true"), ("python3", _WRITE_OUT)):
        path = bin_dir / name
        path.write_text(_STAND_IN.format(name=name, extra=extra))
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls), "OUT": str(tmp_path / "out"),
           "RUNS": str(tmp_path / "runs"), "PART": part, "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, timeout=30).returncode == 0


def test_unknown_part_is_refused(tmp_path):
    result, _ = _run(tmp_path, "everything", 2)
    assert result.returncode == 2 and "choose tests, layouts, moe or bench" in result.stdout, result.stdout


@pytest.mark.parametrize("part, files", [
    ("tests", ["tests/gpu_multi/test_nccl_collectives.py", "tests/gpu_multi/test_gpu_rank_failures.py"]),
    ("layouts", ["tests/gpu_multi/test_gpu_layouts_multi.py -k not moe"]),
    ("moe", ["tests/gpu_multi/test_gpu_layouts_multi.py -k moe"])])
def test_test_parts_run_their_files_under_pytest(tmp_path, part, files):
    result, calls = _run(tmp_path, part, 4)
    assert result.returncode == 0, result.stdout + result.stderr
    pytest_calls = [c for c in calls if c.startswith("python3 -m pytest")]
    assert len(pytest_calls) == 1 and all(f in pytest_calls[0] for f in files), calls
    assert f"pytest {part}: exit 0 (1 passed in 0.1s)" in result.stdout, result.stdout


def _bench(tmp_path, num_gpus):
    result, calls = _run(tmp_path, "bench", num_gpus)
    assert result.returncode == 0, result.stdout + result.stderr
    layouts = [c.split("--out ")[1].rsplit("/", 1)[1] for c in calls
               if c.startswith("python3 benchmarks/gpu_layouts.py") and "--out" in c]
    reduces = [c.split(" -n ")[1].split()[0] for c in calls if c.startswith("mpirun") and "nccl_allreduce" in c]
    compare = [c for c in calls if "--compare" in c]
    return result, layouts, reduces, compare


def test_bench_on_two_gpus_runs_what_fits(tmp_path):
    result, layouts, reduces, compare = _bench(tmp_path, 2)
    assert layouts == ["tp1.json", "tp2.json", "pp2.json"] and reduces == ["2"]
    assert "tp4: skipped, needs 4 GPUs" in result.stdout and "tp8: skipped, needs 8 GPUs" in result.stdout
    assert len(compare) == 1 and compare[0].count(".json") == 3, compare


def test_bench_on_eight_gpus_runs_every_layout(tmp_path):
    _, layouts, reduces, compare = _bench(tmp_path, 8)
    assert layouts == ["tp1.json", "tp2.json", "tp4.json", "tp8.json", "pp2.json", "tp2pp2.json"]
    assert reduces == ["2", "4", "8"] and compare[0].count(".json") == 6


def test_bench_without_gpus_refuses(tmp_path):
    result, calls = _run(tmp_path, "bench", 0)
    assert result.returncode == 1 and "needs GPUs" in result.stdout and not any("python3" in c for c in calls)
