"""Speculative decoding with a draft model: greedy output is exactly plain decoding's whatever the
draft; the target as its own draft has nearly every draft accepted, an unrelated random draft nearly
none. The draft's KV of a shared prefix is reused. The config refuses a draft of another vocabulary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.config import EngineArgs, EngineConfig
from meshlm.engine.draft_model_proposer import DraftModelProposer
from tests.model_factory import make_random_model

pytestmark = pytest.mark.timeout(300)

VOCAB_SIZE = 320
ENGINE = dict(num_kv_blocks=128, block_size=4, max_model_len=96)


@pytest.fixture(scope="module")
def target_path(tmp_path_factory):
    return str(make_random_model(tmp_path_factory.mktemp("target"), "llama", seed=5, vocab_size=VOCAB_SIZE))


@pytest.fixture(scope="module")
def small_draft_path(tmp_path_factory):
    return str(make_random_model(tmp_path_factory.mktemp("draft"), "qwen2", seed=9, vocab_size=VOCAB_SIZE,
                                 num_hidden_layers=1))


def draft_spec(path: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


def generate(model_path: str, spec: dict | None):
    prompts = np.random.default_rng(4).integers(3, VOCAB_SIZE, size=(4, 9)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    with LLM(model_path, speculative_config=spec, **ENGINE) as llm:
        outputs = llm.generate(prompts, params)
        assert llm.engine_core.kv_cache_usage == 0.0  # rolled-back blocks came back too
        stats = llm.engine_core.spec_decode_stats
    return [o.outputs[0].token_ids for o in outputs], stats


@pytest.fixture(scope="module")
def plain(target_path):
    return generate(target_path, None)[0]


def test_target_as_its_own_draft_is_accepted(target_path, plain):
    tokens, stats = generate(target_path, draft_spec(target_path))
    assert tokens == plain
    assert stats.num_draft_tokens >= 4 * 24 // 4  # every decode step drafted
    assert stats.acceptance_rate > 0.9, (stats.num_accepted_tokens, stats.num_draft_tokens)


def test_unrelated_draft_is_rejected_and_output_is_unchanged(target_path, small_draft_path, plain):
    tokens, stats = generate(target_path, draft_spec(small_draft_path))
    assert tokens == plain
    assert stats.num_draft_tokens > 0
    assert stats.acceptance_rate < 0.5, (stats.num_accepted_tokens, stats.num_draft_tokens)


def test_drafts_after_a_reused_prefix_equal_a_fresh_draft(small_draft_path):
    config = EngineConfig.from_args(EngineArgs(small_draft_path, speculative_config=draft_spec(small_draft_path, 4),
                                               max_model_len=64, skip_tokenizer_init=True))
    warm = DraftModelProposer(config.speculative, config.draft_model, config, torch.device("cpu"))
    tokens = np.random.default_rng(1).integers(3, VOCAB_SIZE, size=12).tolist()
    first = warm.propose(tokens, 4)
    # Two drafts accepted, then a token of the target's; then another sequence altogether.
    for sequence in (tokens + first[:2] + [7], tokens[:5] + [8, 9]):
        fresh = DraftModelProposer(config.speculative, config.draft_model, config, torch.device("cpu"))
        assert warm.propose(sequence, 4) == fresh.propose(sequence, 4)
    assert len(warm.propose(tokens + [5] * 50, 4)) == 64 + 1 - 62  # the pool ends at max_model_len


def test_draft_model_config_is_checked(target_path, tmp_path):
    other_vocab = str(make_random_model(tmp_path / "other", "llama", vocab_size=VOCAB_SIZE + 64))
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB_SIZE + 64}, the target vocab_size={VOCAB_SIZE}"):
        EngineConfig.from_args(EngineArgs(target_path, speculative_config=draft_spec(other_vocab)))
    with pytest.raises(ValueError, match="'draft_model' needs a model directory"):
        EngineArgs(speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="method='ngram', model="):
        EngineArgs(speculative_config={"method": "ngram", "model": target_path})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EngineConfig.from_args(EngineArgs(target_path, speculative_config=draft_spec(str(tmp_path / "missing"))))
