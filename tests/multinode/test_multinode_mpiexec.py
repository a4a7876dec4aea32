"""MPI ranks on two hosts (network namespaces with their own addresses), started by hydra's
mpiexec on the first host, which reaches the second through a remote shell (``-launcher rsh
-launcher-exec on_host.sh``, in place of ssh).

tp=2 with one rank per host puts the tensor-parallel all-reduces on the link between the hosts;
tp=2 x pp=2 with two ranks per host keeps each TP pair on a host and sends the pipeline hand-off
across. Each rank's node-local rank (MPI's COMM_TYPE_SHARED split, as meshlm's launcher computes
it) restarts at 0 on each host, and the tokens are the single-rank run's. A plain
``meshlm generate --tp 2`` relaunches itself across both hosts when MESHLM_MPIEXEC_ARGS names them.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.dist.harness import MPIEXEC, launch, rank_env
from tests.multinode.netns import CROSS_HOST_ENV
from tests.slurm.reference import (GENERATE_ARGS, LONG_PROMPT, MAX_TOKENS, PROMPT, assert_same_tokens,
                                   expected_rank_coordinates, logged_rank_coordinates)

RUN_RANK = Path(__file__).resolve().parent / "run_rank.py"
EXIT_RANK = Path(__file__).resolve().parent / "exit_rank.py"
pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")]


def expected_places(hosts: list[str], ranks_per_host: int) -> list[dict]:
    """Hydra fills each host's slots in order: rank r on host r // n with local rank r % n."""
    return [{"rank": r, "size": len(hosts) * ranks_per_host, "local_rank": r % ranks_per_host,
             "local_size": ranks_per_host, "host": hosts[r // ranks_per_host]}
            for r in range(len(hosts) * ranks_per_host)]


@pytest.mark.parametrize("ranks_per_host, tp, pp", [(1, 2, 1), (2, 2, 2)], ids=["tp2-across", "tp2-pp2"])
def test_ranks_on_two_hosts_match_single_rank(two_hosts, multinode_llama, long_prompt_reference, tmp_path,
                                              ranks_per_host, tp, pp):
    a, b = two_hosts.hosts["hosta"], two_hosts.hosts["hostb"]
    out = tmp_path / "result.json"
    mpiexec = [str(MPIEXEC), "-launcher", "rsh", "-launcher-exec", str(two_hosts.on_host_script),
               "-localhost", a.address, "-hosts", f"{a.address}:{ranks_per_host},{b.address}:{ranks_per_host}",
               "-n", str(2 * ranks_per_host)]
    rank_cmd = [sys.executable, str(RUN_RANK), "--model", str(multinode_llama), "--prompt", LONG_PROMPT,
                "--max-tokens", str(MAX_TOKENS), "--tp", str(tp), "--pp", str(pp), "--out", str(out)]
    received_before = two_hosts.rx_bytes("hostb")
    result = launch(two_hosts.command("hosta", [*mpiexec, *rank_cmd]), timeout_s=180,
                    env=rank_env(**CROSS_HOST_ENV))
    assert result.returncode == 0, result.describe()
    data = json.loads(out.read_text())
    assert data["ranks"] == expected_places(["hosta", "hostb"], ranks_per_host), result.describe()
    assert data["token_ids"] == long_prompt_reference.token_ids, result.describe()
    assert data["text"] == long_prompt_reference.text
    received = two_hosts.rx_bytes("hostb") - received_before
    least = least_bytes_into_hostb(multinode_llama, len(LONG_PROMPT.split()), crosses_tp=ranks_per_host == 1)
    assert received >= least, f"hostb received {received} bytes over the link; the activations alone are {least}"


def least_bytes_into_hostb(model_dir: Path, num_prompt_tokens: int, crosses_tp: bool) -> int:
    """What hostb's ranks must receive of the prefill alone, fp32 [num_prompt_tokens, hidden] each:

    TP across the hosts: every layer's two all-reduces (attention out, MLP out), of which a rank
    receives at least its peer's full contribution at 2 ranks. PP across: one hand-off of the
    hidden states to the second stage.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden_bytes = num_prompt_tokens * cfg["hidden_size"] * 4
    return 2 * cfg["num_hidden_layers"] * hidden_bytes if crosses_tp else hidden_bytes


def test_plain_meshlm_generate_relaunches_across_hosts(two_hosts, multinode_llama, multinode_reference):
    """``meshlm generate --tp 2`` from a plain process on hosta, with MESHLM_MPIEXEC_ARGS naming both
    hosts, relaunches itself as one 2-rank job spread over them and prints the single-rank answer."""
    a, b = two_hosts.hosts["hosta"], two_hosts.hosts["hostb"]
    hosts_args = (f"-launcher rsh -launcher-exec {two_hosts.on_host_script} -localhost {a.address} "
                  f"-hosts {a.address}:1,{b.address}:1")
    cmd = [sys.executable, "-m", "meshlm", "generate", PROMPT, "--tp", "2", "--model", str(multinode_llama),
           *GENERATE_ARGS.split()]
    received_before = two_hosts.rx_bytes("hostb")
    result = launch(two_hosts.command("hosta", cmd), timeout_s=180,
                    env=rank_env(MESHLM_MPIEXEC_ARGS=hosts_args, MESHLM_LOG_ALL_RANKS="1", **CROSS_HOST_ENV))
    assert result.returncode == 0, result.describe()
    assert f"-hosts {a.address}:1,{b.address}:1" in result.stderr, result.describe()  # the relaunch line
    assert sorted(logged_rank_coordinates(result.stderr)) == sorted(expected_rank_coordinates(2, 1))
    assert_same_tokens(multinode_llama, multinode_reference, result.stdout.strip(), result.describe())
    assert two_hosts.rx_bytes("hostb") > received_before
    assert "no lifeline" not in result.stderr, result.describe()  # hostb cannot resolve "hosta"


@pytest.mark.parametrize("ranks_per_host", [1, 2])
def test_normal_ends_on_two_hosts_exit_zero(two_hosts, monkeypatch, ranks_per_host):
    """Hydra without its clean-up, as meshlm's relaunch starts it, takes each rank's normal exit for
    a death and signals the other host's proxy, which may have just closed its socket: mpiexec then
    dies of SIGPIPE or ends 255 (about one job in five of this kind, before the ordered exit). Every
    one of 20 jobs ends 0, and every rank's lifeline to rank 0 crossed the link."""
    from meshlm.launcher.world import mpiexec_command
    a, b = two_hosts.hosts["hosta"], two_hosts.hosts["hostb"]
    monkeypatch.setenv("MESHLM_MPIEXEC_ARGS", f"-launcher rsh -launcher-exec {two_hosts.on_host_script} "
                       f"-localhost {a.address} -hosts {a.address}:{ranks_per_host},{b.address}:{ranks_per_host}")
    cmd = mpiexec_command(2 * ranks_per_host, [sys.executable, str(EXIT_RANK)])
    assert "-disable-auto-cleanup" in cmd
    for _ in range(20):
        result = launch(two_hosts.command("hosta", cmd), timeout_s=60, env=rank_env(**CROSS_HOST_ENV))
        assert result.returncode == 0, result.describe()
        ranks = [json.loads(found) for found in re.findall(r"\[exit_rank\] (\{[^}]*\})", result.stdout)]
        assert sorted(r["rank"] for r in ranks) == list(range(2 * ranks_per_host)), result.describe()
        for r in ranks:
            assert r["linked"] == ([0] if r["rank"] else list(range(1, 2 * ranks_per_host))), result.describe()
