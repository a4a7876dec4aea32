"""A long prompt through meshlm and transformers on the same tiny yarn-scaled model (original
context a quarter of its maximum), for the long-context tests on the CPU and the GPU:

    path = make_long_context_model(tmp_path, 8192)
    expected_tokens, expected = transformers_greedy(path, prompt, num_steps=4)
    tokens, logprobs = meshlm_greedy(path, prompt, 8192, max_num_tokens=512, num_steps=4, top_k=5)
"""
from __future__ import annotations

import torch

from tests.model_factory import load_reference, make_random_model

BLOCK_SIZE = 16


def make_long_context_model(path, max_model_len: int):
    """Two layers, two query heads over one KV head of 16 dims: a 32k prompt stays cheap."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": max_model_len // 4}
    return make_random_model(path, "llama", seed=11, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_scaling=scaling,
                             max_position_embeddings=max_model_len)


def _cache_of(out) -> dict:
    """The forward output's KV cache as the next forward's argument: transformers 5.2x names it
    ``cache``, earlier 5.x releases ``past_key_values``."""
    if hasattr(out, "cache"):
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


@torch.no_grad()
def transformers_greedy(path, prompt: list[int], num_steps: int, device: str = "cpu"):
    """Greedy tokens and the log-probabilities [num_steps, vocab] at the last prompt position and
    each decode position (fp32): one forward of the prompt, then one token at a time on its cache."""
    model = load_reference(path).to(device)
    model.config._attn_implementation = "sdpa"  # eager would hold a [32k, 32k] score matrix
    out = model(torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    logits, tokens = [out.logits[0, -1].float().cpu()], []
    for _ in range(num_steps - 1):
        tokens.append(int(logits[-1].argmax()))
        out = model(torch.tensor([[tokens[-1]]], device=device), use_cache=True, **_cache_of(out))
        logits.append(out.logits[0, -1].float().cpu())
    tokens.append(int(logits[-1].argmax()))
    return tokens, torch.log_softmax(torch.stack(logits), dim=-1)


def meshlm_greedy(path, prompt: list[int], max_model_len: int, max_num_tokens: int, num_steps: int,
                  top_k: int, **engine_args):
    """meshlm's greedy tokens and, per step, (token ids, logprobs) of its top ``top_k``."""
    from meshlm import LLM, SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True, logprobs=top_k)
    with LLM(str(path), dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=max_model_len // BLOCK_SIZE + 1,
             max_num_tokens=max_num_tokens, skip_tokenizer_init=True, **engine_args) as llm:
        assert llm.engine_core.max_model_len == max_model_len  # the yarn-scaled context, by default
        completion = llm.generate([prompt], params)[0].outputs[0]
    logprobs = [(torch.tensor(list(entry)), torch.tensor(list(entry.values()))) for entry in completion.logprobs]
    return completion.token_ids, logprobs
