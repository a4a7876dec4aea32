"""Models by repo id under MPI, offline, from a hub cache built in the test.

One rank per node resolves while the others wait and take its answer; tp=2 by repo id (ranks
started by mpiexec, and a plain ``meshlm generate --tp 2`` that relaunches itself) answers as the
single-rank run of the model's directory; a repo missing from the cache fails on every rank with a
message naming the node and the folder looked in.
"""
from __future__ import annotations

import json
import re
import socket
import sys

import pytest

from tests.dist.harness import HERE, MPIEXEC, RUN_LAYOUT, assert_world, launch, mpiexec, rank_env
from tests.hub_cache import COMMIT_A, add_snapshot, offline_hub_env, repo_folder

pytestmark = pytest.mark.timeout(300)

REPO = "org/tiny"
PROMPT_IDS = [5, 17, 42, 9, 33, 61, 7]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(model directory, offline environment of a hub cache holding it as ``org/tiny``)."""
    from tests.model_factory import make_random_model
    root = tmp_path_factory.mktemp("dist-hub")
    model_dir = make_random_model(root / "model", "llama", seed=5)  # 4 heads over 2 KV heads
    add_snapshot(root / "hub", REPO, model_dir, COMMIT_A)
    return model_dir, rank_env(**offline_hub_env(root / "hub"))


def _run_layout(tmp_path, model: str, env: dict, num_ranks: int) -> list[int]:
    spec, out = tmp_path / f"spec-{num_ranks}.json", tmp_path / f"out-{num_ranks}.json"
    spec.write_text(json.dumps({"jobs": [{"name": "hub", "model": model, "prompts": [PROMPT_IDS],
                                          "max_tokens": 8, "ignore_eos": True}]}))
    args = ["--spec", str(spec), "--out", str(out), "--tp", str(num_ranks)]
    if num_ranks == 1:
        result = launch([sys.executable, str(RUN_LAYOUT), *args], timeout_s=180, env=env)
    else:
        result = mpiexec(num_ranks, args, env=env)
        assert_world(result, num_ranks)
    assert result.returncode == 0, result.describe()
    (got,) = json.loads(out.read_text())["results"]["hub"]
    return got["token_ids"]


def test_tp2_by_repo_id_answers_as_one_rank_on_the_directory(hub, tmp_path):
    model_dir, env = hub
    assert _run_layout(tmp_path, REPO, env, 2) == _run_layout(tmp_path, str(model_dir), env, 1)


def test_one_rank_per_node_resolves_and_the_others_take_its_answer(hub):
    _, env = hub
    result = mpiexec(2, ["--model", REPO], env=env, script=HERE / "run_node_once.py")
    assert result.returncode == 0, result.describe()
    assert_world(result, 2)
    workers = re.findall(r"\[node_once\] rank (\d) got \((\d+), (\d+)\)", result.stdout)
    rank0_pid = dict(re.findall(r"\[run_layout\] rank (\d+) of \d+ pid (\d+)", result.stdout))["0"]
    assert sorted(workers) == [("0", "0", rank0_pid), ("1", "0", rank0_pid)], result.describe()
    snapshot = repo_folder(env["HF_HUB_CACHE"], REPO) / "snapshots" / COMMIT_A
    resolved = re.findall(r"\[node_once\] rank (\d) resolved (\S+)", result.stdout)
    assert sorted(resolved) == [("0", str(snapshot)), ("1", str(snapshot))], result.describe()


def test_missing_repo_fails_on_every_rank_naming_node_and_folder(hub):
    _, env = hub
    result = mpiexec(2, ["--model", "org/absent"], env=env, script=HERE / "run_node_once.py")
    assert result.returncode == 0, result.describe()
    errors = re.findall(r"\[node_once\] rank (\d) error: (.*)", result.stdout)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], result.describe()
    folder = str(repo_folder(env["HF_HUB_CACHE"], "org/absent"))
    for _, message in errors:
        assert socket.gethostname() in message and folder in message, result.describe()


def _cli_generate(model: str, env: dict, *flags: str):
    return launch([sys.executable, "-m", "meshlm", "generate", "w5 w17 w42", "--no-chat", "--model", model,
                   "--max-tokens", "6", "--num-kv-blocks", "32", "--max-model-len", "128", *flags],
                  timeout_s=240, env=env)


def test_cli_tp2_by_repo_id_relaunches_and_answers_as_one_rank(hub):
    model_dir, env = hub
    reference = _cli_generate(str(model_dir), env)
    assert reference.returncode == 0, reference.describe()
    result = _cli_generate(REPO, {**env, "MESHLM_LOG_LEVEL": "INFO"}, "--tp", "2")
    assert result.returncode == 0, result.describe()
    assert "[meshlm rank 0 tp 0/2]" in result.stderr, result.describe()
    assert result.stdout == reference.stdout and result.stdout.strip(), result.describe()


def test_cli_under_mpiexec_names_the_missing_repo(hub):
    _, env = hub
    result = launch([str(MPIEXEC), "-n", "2", sys.executable, "-m", "meshlm", "generate", "hi", "--tp", "2",
                     "--model", "org/absent"], timeout_s=120, env=env)
    assert result.returncode != 0, result.describe()
    assert socket.gethostname() in result.stderr and "models--org--absent" in result.stderr, result.describe()
