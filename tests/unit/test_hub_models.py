"""Models by Hugging Face repo id, offline: a hub cache built in the test holds tiny random models.

The repo id resolves to its snapshot (``--revision`` picks another), ``--download-dir`` and
HF_HOME move the cache, a missing repo names the node and the folder looked in, a local path wins
over a repo id, and ``LLM("org/tiny")`` and ``meshlm generate --model org/tiny`` answer as the same
model given by its directory.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from meshlm.weights.resolve import resolve_model
from tests.hub_cache import COMMIT_A, COMMIT_B, add_snapshot, offline_hub_env, repo_folder
from tests.model_factory import make_random_model

REPO = "org/tiny"
PROMPT = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-models")
    return {"a": make_random_model(root / "a", "llama", num_hidden_layers=1, seed=1),
            "b": make_random_model(root / "b", "llama", num_hidden_layers=1, seed=2)}


@pytest.fixture()
def hub_cache(tmp_path, models, monkeypatch) -> Path:
    """``org/tiny``: main -> model a (COMMIT_A); tag v2 -> model b (COMMIT_B). Offline."""
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, models["a"], COMMIT_A, refs=("main",))
    add_snapshot(cache, REPO, models["b"], COMMIT_B, refs=("v2",))
    for name, value in offline_hub_env(cache).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no ./org/tiny here
    return cache


def test_repo_id_resolves_to_its_main_snapshot(hub_cache):
    assert resolve_model(REPO) == repo_folder(hub_cache, REPO) / "snapshots" / COMMIT_A


@pytest.mark.parametrize("revision", ["v2", COMMIT_B])
def test_revision_picks_a_snapshot(hub_cache, revision):
    assert resolve_model(REPO, revision=revision) == repo_folder(hub_cache, REPO) / "snapshots" / COMMIT_B


def test_download_dir_is_the_cache_looked_in(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert resolve_model(REPO, download_dir=str(hub_cache)).parent.parent == repo_folder(hub_cache, REPO)
    with pytest.raises(FileNotFoundError):
        resolve_model(REPO)


def test_hf_home_holds_the_hub_cache(hub_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # the cache is $HF_HOME/hub
    assert resolve_model(REPO) == repo_folder(hub_cache, REPO) / "snapshots" / COMMIT_A


@pytest.mark.parametrize("repo_id, revision", [("org/absent", None), (REPO, "no-such-branch")])
def test_missing_snapshot_offline_names_the_node_and_the_folder(hub_cache, repo_id, revision):
    with pytest.raises(FileNotFoundError) as excinfo:
        resolve_model(repo_id, revision=revision)
    message = str(excinfo.value)
    assert socket.gethostname() in message and str(repo_folder(hub_cache, repo_id)) in message, message
    assert "HF_HUB_OFFLINE" in message and repr(revision or "main") in message, message
    assert f"No local path {Path(repo_id).resolve()}" in message, message


def test_a_local_directory_wins_over_a_repo_id(hub_cache, tmp_path, models):
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    assert resolve_model(REPO) == Path(REPO)


@pytest.mark.parametrize("model", ["org/team/model", "./no-such-dir", "org/bad--name", "/no/such/model"])
def test_neither_a_path_nor_a_repo_id_is_a_clear_error(hub_cache, model):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id") as excinfo:
        resolve_model(model)
    assert socket.gethostname() in str(excinfo.value) and model in str(excinfo.value)


def test_only_the_files_meshlm_reads_are_fetched():
    from huggingface_hub.utils import filter_repo_objects
    from meshlm.weights.hub import ALLOW_PATTERNS, IGNORE_PATTERNS
    read = {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"}
    not_read = {"README.md", ".gitattributes", "pytorch_model.bin", "consolidated.safetensors",
                "original/consolidated.00.pth", "original/model.safetensors", "tokenizer.model", "LICENSE"}
    kept = set(filter_repo_objects(sorted(read | not_read), allow_patterns=ALLOW_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS))
    assert kept == read


def _greedy_ids(model: str, **engine_args) -> list[int]:
    from meshlm import LLM, SamplingParams
    llm = LLM(model, device="cpu", num_kv_blocks=16, max_model_len=64, **engine_args)
    try:
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        return out[0].outputs[0].token_ids
    finally:
        llm.shutdown()


def test_llm_by_repo_id_and_revision_answers_as_the_directory(hub_cache, models):
    by_dir = {name: _greedy_ids(str(path)) for name, path in models.items()}
    assert by_dir["a"] != by_dir["b"]  # the two revisions are told apart by their answers
    assert _greedy_ids(REPO) == by_dir["a"]
    assert _greedy_ids(REPO, revision="v2") == by_dir["b"]


def test_cli_generate_by_repo_id_prints_the_directory_answer(hub_cache, models, capsys):
    from meshlm.cli import main
    argv = ["generate", "w5 w17 w42", "--no-chat", "--max-tokens", "6", "--device", "cpu",
            "--num-kv-blocks", "16", "--max-model-len", "64"]
    assert main(argv + ["--model", str(models["b"])]) == 0
    expected = capsys.readouterr().out
    assert main(argv + ["--model", REPO, "--revision", "v2"]) == 0
    assert capsys.readouterr().out == expected
    assert main(argv + ["--model", REPO]) == 0
    assert capsys.readouterr().out != expected  # main is another model


def test_cli_names_a_missing_repo(hub_cache, capsys):
    from meshlm.cli import main
    assert main(["generate", "hi", "--model", "org/absent", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "org/absent" in err and socket.gethostname() in err and str(hub_cache) in err, err
