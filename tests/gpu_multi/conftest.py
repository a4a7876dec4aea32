"""Fixtures of the multi-GPU tests: random-weight models shaped for the GPU kernels (head_dim 64),
and prompts of mixed lengths."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_factory import make_random_model, make_random_moe_model, random_prompts

# hidden 256 over 4 heads: head_dim 64, as the Triton attention kernels take it; 4 heads and 2 KV
# heads split at tp=2 and tp=4 (KV heads replicated there), the 1-KV-head model replicates at tp=2.
GPU_SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                 num_hidden_layers=3)
PROMPT_LENGTHS = (3, 11, 26, 40)  # one and several KV blocks of 16


@pytest.fixture(scope="session")
def gpu_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-multi-models")
    return {
        "llama": make_random_model(root / "llama", "llama", seed=3, **GPU_SHAPE),
        "qwen2-kv1": make_random_model(root / "qwen2-kv1", "qwen2", seed=4, **{**GPU_SHAPE, "num_key_value_heads": 1}),
        "mixtral": make_random_moe_model(root / "mixtral", "mixtral", seed=5, **GPU_SHAPE),
    }


@pytest.fixture(scope="session")
def gpu_prompts() -> list[list[int]]:
    return random_prompts(320, PROMPT_LENGTHS, seed=6)
