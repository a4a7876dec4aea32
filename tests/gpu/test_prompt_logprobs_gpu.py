"""prompt_logprobs on a GPU (CUDA graphs on, the overlapped loop, chunked prefill) against the CPU
reference path on the same random weights."""
from __future__ import annotations

import pytest
import torch

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [list(range(10, 80)), [5, 17, 33, 91, 4], [3 + (7 * i) % 300 for i in range(430)]]  # 430 tokens: 4 chunks


def _run(path, device: str):
    llm = LLM(str(path), device=device, dtype="float32", block_size=16, max_model_len=512, num_kv_blocks=256,
              max_num_tokens=128)
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=5),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)]
    outs = llm.generate(PROMPTS, params)
    llm.shutdown()
    return outs


def test_gpu_prompt_logprobs_match_cpu(tmp_path):
    path = make_random_model(tmp_path / "m", "llama", weight_std=0.2, hidden_size=256, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512)
    cpu, gpu = _run(path, "cpu"), _run(path, "cuda")
    assert gpu[1].prompt_logprobs is None
    for c, g in zip(cpu, gpu):
        assert g.outputs[0].token_ids == c.outputs[0].token_ids
        if c.prompt_logprobs is None:
            continue
        assert len(g.prompt_logprobs) == len(c.prompt_logprobs) and g.prompt_logprobs[0] is None
        for entry_c, entry_g in zip(c.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert next(iter(entry_g)) == next(iter(entry_c))
            for token in set(entry_c) & set(entry_g):
                assert abs(entry_g[token] - entry_c[token]) < 2e-3
