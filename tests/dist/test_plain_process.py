"""``LLM(model, tensor_parallel_size=2)`` and ``AsyncLLM`` from a plain Python process (not under mpiexec).

The process starts mpiexec itself; the tokens equal the single-rank run's, and after shutdown
the process exits 0 with nothing left of the job it started.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.dist.harness import HERE, TINY_MAX_TOKENS, launch
from tests.dist.proc_tree import wait_until_gone

pytestmark = pytest.mark.timeout(300)


def _run_plain(tmp_path, model: Path, prompts: list, *flags: str) -> dict:
    prompts_path, out = tmp_path / "prompts.json", tmp_path / "out.json"
    prompts_path.write_text(json.dumps(prompts))
    result = launch([sys.executable, str(HERE / "run_plain_llm.py"), "--model", str(model),
                     "--prompts", str(prompts_path), "--out", str(out), "--tp", "2",
                     "--max-tokens", str(TINY_MAX_TOKENS), *flags], timeout_s=240)
    assert result.returncode == 0, result.describe()
    return json.loads(out.read_text())


def _without_tokenizer(tmp_path, model: Path) -> Path:
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(model, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    return bare


def test_llm_tp2_from_plain_process(tmp_path, tiny_models, tiny_prompts, tiny_runs):
    """Also ``skip_tokenizer_init=True`` on a model directory that has no tokenizer files at all."""
    bare = _without_tokenizer(tmp_path, tiny_models["llama"])
    data = _run_plain(tmp_path, bare, tiny_prompts, "--skip-tokenizer-init")

    # While the model was up: one mpiexec and exactly two ranks below this process.
    running = data["processes_while_running"]
    ranks = [p for p in running if "meshlm.api.remote_rank0" in p["cmdline"] and "mpiexec" not in p["cmdline"]]
    launchers = [p for p in running if p["cmdline"].split()[0].endswith("mpiexec")]
    assert len(ranks) == 2 and " -n 2 " in launchers[0]["cmdline"], running
    assert len(launchers) == 1, running

    ref = tiny_runs.get(1, 1)["llama"]
    assert [r["token_ids"] for r in data["results"]] == [r["token_ids"] for r in ref]
    assert wait_until_gone([p["pid"] for p in running]) == [], f"processes outlived shutdown: {running}"


def test_async_llm_tp2_from_plain_process(tmp_path, tiny_models, tiny_prompts, tiny_runs):
    data = _run_plain(tmp_path, tiny_models["llama"], tiny_prompts, "--api", "AsyncLLM")
    ref = tiny_runs.get(1, 1)["llama"]
    assert [r["token_ids"] for r in data["results"]] == [r["token_ids"] for r in ref]
    assert wait_until_gone([p["pid"] for p in data["processes_while_running"]]) == []
