"""Speculative decoding on a GPU: n-gram drafts verified by the Triton attention (several query
tokens per sequence over the paged cache) give plain decoding's greedy tokens in fp32, while steps
without drafts still replay the decode graphs."""
from __future__ import annotations

import pytest
import torch

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = [[5, 17, 33, 91] * 6, list(range(10, 40)) * 2, [7, 8, 9] * 9, list(range(100, 300, 3))]


def run(path, spec):
    with LLM(str(path), device="cuda", dtype="float32", block_size=16, max_model_len=512, num_kv_blocks=256,
             speculative_config=spec) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
        stats = llm.engine_core.spec_decode_stats
        runner = llm.local_model_runner()
        replays = 0 if runner.graph_runner is None else runner.graph_runner.num_replays
        assert llm.engine_core.kv_cache_usage == 0.0
    return [o.outputs[0].token_ids for o in outs], stats, replays


def test_gpu_greedy_ngram_equals_plain(tmp_path):
    path = make_random_model(tmp_path / "llama", "llama", weight_std=0.2, hidden_size=256, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512)
    plain, _, _ = run(path, None)
    spec, stats, replays = run(path, NGRAM)
    assert spec == plain
    assert stats.num_draft_tokens > 0
    print(f"acceptance {stats.acceptance_rate:.2f}, {replays} graph replays")


def test_gpu_greedy_draft_model_equals_plain(tmp_path):
    """The target as its own draft model: the draft's prefill and decodes over its own pool run the
    same Triton attention; greedy tokens are plain decoding's, nearly every draft accepted."""
    path = make_random_model(tmp_path / "llama", "llama", weight_std=0.2, hidden_size=256, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512)
    plain, _, _ = run(path, None)
    spec, stats, _ = run(path, {"method": "draft_model", "model": str(path), "num_speculative_tokens": 4})
    assert spec == plain
    assert stats.acceptance_rate > 0.9, (stats.num_accepted_tokens, stats.num_draft_tokens)
