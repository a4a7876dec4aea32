"""Speculative decoding under mpiexec: at tp=3 and pp=2 the greedy tokens with n-gram drafts equal
those of plain decoding on one rank, for a tiny random model (prompts that repeat spans) and for the
default model (a chat prompt whose answer repeats a text); so do the tiny model's with itself as the
draft model and with an unrelated one-layer random draft of its vocabulary (rank 0 runs the whole
draft whatever the layout)."""
from __future__ import annotations

import json
import random

import pytest

from tests.dist.harness import LayoutRuns

pytestmark = pytest.mark.timeout(600)

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
REPEAT_PROMPT = ("Repeat this sentence exactly: the quick brown fox jumps over the lazy dog, "
                 "and the lazy dog sleeps in the warm sun.")


@pytest.fixture(scope="module")
def tiny_model_tp3(tmp_path_factory):
    """6 heads over 3 KV heads, an MLP of 192: tp=3 gives each rank 2 heads and one KV head."""
    from tests.model_factory import make_random_model
    return make_random_model(tmp_path_factory.mktemp("llama-h6") / "m", "llama", seed=5, hidden_size=96,
                             num_attention_heads=6, num_key_value_heads=3, intermediate_size=192)


@pytest.fixture(scope="module")
def spec_runs(tmp_path_factory, tiny_model_tp3, default_model) -> LayoutRuns:
    from tests.model_factory import make_random_model
    vocab = json.loads((tiny_model_tp3 / "config.json").read_text())["vocab_size"]
    small_draft = make_random_model(tmp_path_factory.mktemp("qwen2-draft") / "m", "qwen2", seed=9,
                                    vocab_size=vocab, num_hidden_layers=1)
    rng = random.Random(99)
    spans = [[rng.randrange(3, vocab) for _ in range(n)] for n in (5, 8, 3)]
    prompts = [spans[0] * 3, spans[1] * 2 + spans[0], spans[2] * 5]
    tiny = {"model": str(tiny_model_tp3), "prompts": prompts, "max_tokens": 24, "ignore_eos": True,
            "num_kv_blocks": 64, "block_size": 4, "max_model_len": 128}
    default = {"model": str(default_model), "prompts": [REPEAT_PROMPT], "chat": True, "max_tokens": 24,
               "ignore_eos": False, "max_model_len": 512}
    draft = {"method": "draft_model", "model": str(tiny_model_tp3), "num_speculative_tokens": 3}
    small = {"method": "draft_model", "model": str(small_draft), "num_speculative_tokens": 2}
    jobs = [{"name": "tiny-plain", **tiny}, {"name": "tiny-ngram", **tiny, "speculative_config": NGRAM},
            {"name": "tiny-draft", **tiny, "speculative_config": draft},
            {"name": "tiny-small-draft", **tiny, "speculative_config": small},
            {"name": "default-plain", **default}, {"name": "default-ngram", **default, "speculative_config": NGRAM}]
    return LayoutRuns(tmp_path_factory.mktemp("spec-runs"), jobs)


def token_ids(results: dict, name: str) -> list[list[int]]:
    return [r["token_ids"] for r in results[name]]


def test_single_rank_ngram_equals_plain(spec_runs):
    results = spec_runs.get(1, 1)
    for model in ("tiny", "default"):
        assert token_ids(results, f"{model}-ngram") == token_ids(results, f"{model}-plain"), model
    assert token_ids(results, "tiny-draft") == token_ids(results, "tiny-plain")
    assert token_ids(results, "tiny-small-draft") == token_ids(results, "tiny-plain")


@pytest.mark.parametrize("tp, pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
def test_layout_ngram_equals_single_rank_plain(spec_runs, tp, pp):
    reference = spec_runs.get(1, 1)
    results = spec_runs.get(tp, pp)
    for model in ("tiny", "default"):
        assert token_ids(results, f"{model}-ngram") == token_ids(reference, f"{model}-plain"), f"{model} tp={tp} pp={pp}"
    assert token_ids(results, "tiny-draft") == token_ids(reference, "tiny-plain"), f"draft model tp={tp} pp={pp}"
    assert token_ids(results, "tiny-small-draft") == token_ids(reference, "tiny-plain"), f"small draft tp={tp} pp={pp}"
