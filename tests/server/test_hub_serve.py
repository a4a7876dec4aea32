"""``meshlm serve --model ORG/NAME`` from an offline hub cache: /v1/models names the repo id (vLLM's
default served name), completions answer under that name, ``--served-model-name`` still wins."""
from __future__ import annotations

import httpx
import pytest

from tests.hub_cache import COMMIT_A, add_snapshot, offline_hub_env, repo_folder
from tests.server.harness import ServeProcess

REPO = "org/tiny-chat"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def hub_cache(tmp_path, model_dir, monkeypatch):
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, model_dir, COMMIT_A)
    for name, value in offline_hub_env(cache).items():
        monkeypatch.setenv(name, value)  # the server process inherits them
    monkeypatch.chdir(tmp_path)
    return cache


def _models_and_answer(port: int, name: str) -> tuple[dict, int]:
    base = f"http://127.0.0.1:{port}"
    models = httpx.get(f"{base}/v1/models", timeout=30).json()
    answer = httpx.post(f"{base}/v1/completions", timeout=60,
                        json={"model": name, "prompt": "w5 w6", "max_tokens": 3, "temperature": 0})
    return models, answer.status_code


def test_served_name_is_the_repo_id(hub_cache, tmp_path):
    server = ServeProcess(REPO, tmp_path / "server.log")
    try:
        models, status = _models_and_answer(server.port, REPO)
    finally:
        server.stop()
    (entry,) = models["data"]
    assert entry["id"] == REPO, models
    assert entry["root"] == str(repo_folder(hub_cache, REPO) / "snapshots" / COMMIT_A), models
    assert status == 200


def test_served_model_name_overrides_the_repo_id(hub_cache, tmp_path):
    server = ServeProcess(REPO, tmp_path / "server.log", "--served-model-name", "mine")
    try:
        models, status = _models_and_answer(server.port, "mine")
    finally:
        server.stop()
    assert [entry["id"] for entry in models["data"]] == ["mine"] and status == 200, models
