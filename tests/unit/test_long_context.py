"""Long contexts on the CPU: a tiny yarn-scaled model (original context 1/4 of its maximum) reads a
prompt near its maximum in chunks of ``max_num_tokens``, then decodes; its greedy tokens and
log-probabilities match transformers' on the same weights (fp32), and the prompt read in one
step gives the same answer. 8k tokens in 16 chunks always; 32k in 16 chunks is marked slow.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from meshlm import LLM, SamplingParams  # noqa: E402
from tests.model_factory import load_reference, make_random_model, random_prompts  # noqa: E402

NUM_CHUNKS = 16
NUM_STEPS = 4
TOP_K = 5
ATOL = 2e-4
BLOCK_SIZE = 16


def make_model(path, max_model_len: int):
    """Two layers, two query heads over one KV head of 16 dims: a 32k prompt stays cheap."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": max_model_len // 4}
    return make_random_model(path, "llama", seed=11, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_scaling=scaling,
                             max_position_embeddings=max_model_len)


@torch.no_grad()
def transformers_greedy(path, prompt: list[int], num_steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the log-probabilities [num_steps, vocab] at the last prompt position and
    each decode position: one forward of the prompt, then one token at a time on its cache."""
    model = load_reference(path)
    model.config._attn_implementation = "sdpa"  # eager would hold a [32k, 32k] score matrix
    out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    logits, tokens = [out.logits[0, -1].float()], []
    for _ in range(num_steps - 1):
        tokens.append(int(logits[-1].argmax()))
        out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
        logits.append(out.logits[0, -1].float())
    tokens.append(int(logits[-1].argmax()))
    return tokens, torch.log_softmax(torch.stack(logits), dim=-1)


def meshlm_greedy(path, prompt: list[int], max_model_len: int, max_num_tokens: int):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_STEPS, ignore_eos=True, logprobs=TOP_K)
    with LLM(str(path), dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=max_model_len // BLOCK_SIZE + 1,
             max_num_tokens=max_num_tokens, skip_tokenizer_init=True) as llm:
        assert llm.engine_core.max_model_len == max_model_len  # the yarn-scaled context, by default
        completion = llm.generate([prompt], params)[0].outputs[0]
    logprobs = [(torch.tensor(list(entry)), torch.tensor(list(entry.values()))) for entry in completion.logprobs]
    return completion.token_ids, logprobs


def check_long_prompt(tmp_path, max_model_len: int) -> None:
    path = make_model(tmp_path, max_model_len)
    prompt_len = max_model_len - NUM_STEPS - 60  # not a multiple of the chunk or the block size
    prompt = random_prompts(320, [prompt_len], seed=7)[0]
    chunk = -(-prompt_len // NUM_CHUNKS)

    expected_tokens, expected = transformers_greedy(path, prompt, NUM_STEPS)
    tokens, logprobs = meshlm_greedy(path, prompt, max_model_len, max_num_tokens=chunk)
    assert tokens == expected_tokens
    for step, (ids, values) in enumerate(logprobs):
        torch.testing.assert_close(values, expected[step][ids], atol=ATOL, rtol=0,
                                   msg=lambda m: f"step {step} after {prompt_len} prompt tokens: {m}")
        torch.testing.assert_close(values.sort(descending=True).values, expected[step].topk(TOP_K).values,
                                   atol=ATOL, rtol=0)

    whole_tokens, whole_logprobs = meshlm_greedy(path, prompt, max_model_len, max_num_tokens=max_model_len)
    assert whole_tokens == tokens
    for (ids, values), (whole_ids, whole_values) in zip(logprobs, whole_logprobs):
        torch.testing.assert_close(whole_values, values, atol=1e-5, rtol=0)


def test_8k_prompt_in_16_chunks_matches_transformers(tmp_path):
    check_long_prompt(tmp_path, 8192)


@pytest.mark.slow
def test_32k_prompt_in_16_chunks_matches_transformers(tmp_path):
    check_long_prompt(tmp_path, 32768)


def test_a_prompt_past_the_scaled_context_is_refused(tmp_path):
    path = make_model(tmp_path, 1024)
    with LLM(str(path), dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=65, skip_tokenizer_init=True) as llm:
        with pytest.raises(ValueError) as err:
            llm.generate([random_prompts(320, [1024], seed=1)[0]], SamplingParams(max_tokens=1))
    assert "1024" in str(err.value) and "max_model_len" in str(err.value)
