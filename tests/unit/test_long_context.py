"""Long contexts on the CPU: a tiny yarn-scaled model reads a prompt near its maximum context in
chunks of ``max_num_tokens``, then decodes; its greedy tokens and log-probabilities match
transformers' on the same weights (fp32), and the prompt read in one step gives the same answer.
8k tokens in 16 chunks always; 32k in 16 chunks is marked slow.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from meshlm import LLM, SamplingParams  # noqa: E402
from tests.long_context import (BLOCK_SIZE, make_long_context_model, meshlm_greedy,  # noqa: E402
                                transformers_greedy)
from tests.model_factory import random_prompts  # noqa: E402

NUM_CHUNKS = 16
NUM_STEPS = 4
TOP_K = 5
ATOL = 2e-4


def check_long_prompt(tmp_path, max_model_len: int) -> None:
    path = make_long_context_model(tmp_path, max_model_len)
    prompt_len = max_model_len - NUM_STEPS - 60  # not a multiple of the chunk or the block size
    prompt = random_prompts(320, [prompt_len], seed=7)[0]
    chunk = -(-prompt_len // NUM_CHUNKS)

    expected_tokens, expected = transformers_greedy(path, prompt, NUM_STEPS)
    tokens, logprobs = meshlm_greedy(path, prompt, max_model_len, chunk, NUM_STEPS, TOP_K)
    assert tokens == expected_tokens
    for step, (ids, values) in enumerate(logprobs):
        torch.testing.assert_close(values, expected[step][ids], atol=ATOL, rtol=0,
                                   msg=lambda m: f"step {step} after {prompt_len} prompt tokens: {m}")
        torch.testing.assert_close(values.sort(descending=True).values, expected[step].topk(TOP_K).values,
                                   atol=ATOL, rtol=0)

    whole_tokens, whole_logprobs = meshlm_greedy(path, prompt, max_model_len, max_model_len, NUM_STEPS, TOP_K)
    assert whole_tokens == tokens
    for (ids, values), (whole_ids, whole_values) in zip(logprobs, whole_logprobs):
        torch.testing.assert_close(whole_values, values, atol=1e-5, rtol=0)


def test_8k_prompt_in_16_chunks_matches_transformers(tmp_path):
    check_long_prompt(tmp_path, 8192)


@pytest.mark.slow
def test_32k_prompt_in_16_chunks_matches_transformers(tmp_path):
    check_long_prompt(tmp_path, 32768)


def test_a_prompt_past_the_scaled_context_is_refused(tmp_path):
    path = make_long_context_model(tmp_path, 1024)
    with LLM(str(path), dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=65, skip_tokenizer_init=True) as llm:
        with pytest.raises(ValueError) as err:
            llm.generate([random_prompts(320, [1024], seed=1)[0]], SamplingParams(max_tokens=1))
    assert "1024" in str(err.value) and "max_model_len" in str(err.value)
