"""Tensor, pipeline and tensor x pipeline parallel runs give the single-rank results.

Random-weight Llama, Qwen3 and Qwen2 models (see harness.TINY_MODELS) run a batch of prompts of
mixed lengths at tp=2 (2 ranks), pp=2 (2 ranks) and tp=2 x pp=2 (4 ranks) under mpiexec; greedy
tokens must equal those of the single-rank run and the top-20 logprobs agree to fp32 precision.
"""
from __future__ import annotations

import json

import pytest

from tests.dist.harness import TINY_MAX_TOKENS, TINY_MODELS, assert_top_logprobs_close

pytestmark = pytest.mark.timeout(300)

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "tp2-pp2": (2, 2)}
LOGPROB_TOL = 1e-4  # fp32: the ranks sum partial products in another order


def test_tiny_models_exercise_the_head_splits(tiny_models):
    """At tp=2 the 2-KV-head models split their KV heads and the 1-KV-head model replicates its."""
    heads = {name: json.loads((path / "config.json").read_text()) for name, path in tiny_models.items()}
    assert {n: (c["num_attention_heads"], c["num_key_value_heads"]) for n, c in heads.items()} == {
        "llama": (4, 2), "qwen3": (4, 2), "qwen2-kv1": (4, 1)}
    assert heads["llama"]["num_hidden_layers"] % 2 == 1  # pp=2 gets an uneven split


@pytest.mark.parametrize("model", list(TINY_MODELS))
def test_single_rank_reference_is_greedy(tiny_runs, tiny_prompts, model):
    """The reference the layouts are held to: each token is the most likely of its top 20."""
    results = tiny_runs.get(1, 1)[model]
    assert len(results) == len(tiny_prompts)
    for out in results:
        assert len(out["token_ids"]) == TINY_MAX_TOKENS
        for token, top in zip(out["token_ids"], out["logprobs"]):
            assert len(top) == 20
            assert max(top, key=top.get) == str(token)
            assert all(lp <= 0.0 for lp in top.values())
    # Different prompts lead to different continuations: the model is not degenerate.
    assert len({tuple(out["token_ids"]) for out in results}) == len(results)


@pytest.mark.parametrize("model", list(TINY_MODELS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(tiny_runs, tiny_prompts, layout, model):
    tp, pp = LAYOUTS[layout]
    ref = tiny_runs.get(1, 1)[model]
    got = tiny_runs.get(tp, pp)[model]
    assert len(got) == len(tiny_prompts)
    for i, (r, g) in enumerate(zip(ref, got)):
        where = f"{model} {layout} prompt {i} ({len(tiny_prompts[i])} tokens)"
        assert g["token_ids"] == r["token_ids"], where
        assert_top_logprobs_close(r["logprobs"], g["logprobs"], LOGPROB_TOL, where)
