"""A rank killed on the GPU ends the whole job, naming the rank, within a bounded time.

Two ranks run a tiny Llama at tp=2 on two GPUs, decode steps in CUDA graphs that hold NCCL calls;
rank 1 SIGKILLs itself inside its 4th step (run_layout.py ``--fault kill``). Rank 0 is then
waiting on an NCCL all-reduce whose peer is gone, which never returns by itself: the job must
still end, non-zero, within MAX_END_AFTER_KILL_S of the kill, with every rank gone and a message
naming rank 1 (meshlm's, when the launcher leaves the ending to meshlm as under MPICH's hydra with
its clean-up off; or Open MPI's mpirun's, which ends the job itself and names the rank).
"""
from __future__ import annotations

import json
import re
import sys

import pytest

from tests.dist.harness import MPIEXEC, RUN_LAYOUT, assert_world
from tests.dist.proc_tree import wait_until_gone
from tests.gpu_multi.gpu_ranks import gpu_env, launch_watching, leave_ending_to_meshlm, needs_gpus

pytestmark = [pytest.mark.gpu, needs_gpus(2), pytest.mark.timeout(300),
              pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")]

FAULT_STEP = 4  # prefill is step 1, then one decode step (a graph replay) per token
MAX_END_AFTER_KILL_S = 30.0


def test_sigkill_of_a_rank_on_the_gpu_ends_the_job_naming_it(tmp_path, gpu_models, gpu_prompts):
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"jobs": [{
        "name": "llama", "model": str(gpu_models["llama"]), "prompts": gpu_prompts, "max_tokens": 40,
        "ignore_eos": True, "device": "cuda", "dtype": "bfloat16"}]}))
    cmd = [str(MPIEXEC), *leave_ending_to_meshlm(), "-n", "2", sys.executable, str(RUN_LAYOUT), "--spec", str(spec),
           "--out", str(out), "--tp", "2", "--fault", "kill", "--fault-rank", "1", "--fault-step", str(FAULT_STEP)]
    result, after_kill_s = launch_watching(cmd, timeout_s=240, env=gpu_env(), marker="[run_layout rank 1] injecting kill")
    assert_world(result, 2)
    assert after_kill_s is not None, f"the fault never fired\n{result.describe()}"
    assert result.returncode != 0, result.describe()
    assert after_kill_s < MAX_END_AFTER_KILL_S, f"{after_kill_s:.1f} s after the kill\n{result.describe()}"
    assert wait_until_gone(result.reported_pids()) == [], "ranks outlived mpiexec"
    pids = dict(re.findall(r"\[run_layout\] rank (\d+) of \d+ pid (\d+)", result.stdout))
    pid = int(pids["1"])
    named_by_meshlm = re.search(rf"\[meshlm rank 0\] rank 1 \(host [^,]+, pid {pid}\) died", result.stderr)
    # Open MPI 4 may print the pid as 0 there; the rank number is what names it
    named_by_open_mpi = re.search(r"process rank 1 with PID \d+", result.output)
    assert named_by_meshlm or named_by_open_mpi, result.describe()
