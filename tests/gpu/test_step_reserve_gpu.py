"""The memory a step takes stays within what the KV pool leaves for it (executor/memory.py), on a GPU.

    python3 -m pytest -q tests/gpu/test_step_reserve_gpu.py

A two-layer model of Llama-3-8B's widths and vocabulary (so the activations and the logits, not
the reserve's fixed gibibyte, make the numbers), 16384 tokens a step and 2048 rows: the
allocator's peak in a full-size prefill step within the activations' part of the reserve, and
in sampling 2048 rows with every filter, penalty and logprobs within the logits' part (both
without the fixed part). Sampling the 2048 rows at once had taken 10.8 GiB on an H200 against
those parts' 2.45 GiB (benchmarks/activation_peak.py prints the same numbers for any shape).
"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks.activation_peak import measure
from meshlm import LLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WIDE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_a_step_stays_within_its_reserve(quantization, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(WIDE))
    llm = LLM(str(tmp_path), load_format="random", skip_tokenizer_init=True, max_model_len=4096,
              max_num_tokens=16384, max_batch_size=2048, gpu_memory_utilization=0.5,
              **({"quantization": quantization} if quantization else {}))
    try:
        rows = measure(llm, prompt_len=2048)
    finally:
        llm.shutdown()
    for name, peak, part in rows:
        assert 0 < peak <= part, f"{name}: peak {peak / 2**30:.2f} GiB, reserved {part / 2**30:.2f} GiB"
