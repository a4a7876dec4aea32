"""Long contexts on the GPU: a 32k-token prompt of a tiny yarn-scaled model in 16 chunks through
the Triton attention kernels (fp32), then decode steps through the split-KV decode kernel in
CUDA graphs; greedy tokens and log-probabilities against transformers on the same weights."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("triton")

from tests.long_context import make_long_context_model, meshlm_greedy, transformers_greedy  # noqa: E402
from tests.model_factory import random_prompts  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_STEPS = 8
TOP_K = 5
ATOL = 5e-4  # fp32 through tf32x3 products on the tensor cores


@pytest.mark.parametrize("max_model_len", [8192, 32768])
def test_long_prompt_in_16_chunks_matches_transformers(tmp_path, max_model_len):
    path = make_long_context_model(tmp_path, max_model_len)
    prompt_len = max_model_len - NUM_STEPS - 60
    prompt = random_prompts(320, [prompt_len], seed=7)[0]
    expected_tokens, expected = transformers_greedy(path, prompt, NUM_STEPS, device="cuda")
    tokens, logprobs = meshlm_greedy(path, prompt, max_model_len, -(-prompt_len // 16), NUM_STEPS, TOP_K,
                                     max_batch_size=4)
    assert tokens == expected_tokens
    for step, (ids, values) in enumerate(logprobs):
        torch.testing.assert_close(values, expected[step][ids], atol=ATOL, rtol=0,
                                   msg=lambda m: f"step {step} after {prompt_len} prompt tokens: {m}")
