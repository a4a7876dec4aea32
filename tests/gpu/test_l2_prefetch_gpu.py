"""L2 prefetches (kernels/l2_prefetch.py) on a GPU: the kernel runs eagerly and inside a CUDA graph
and leaves the weight as it was, and a model decodes the same tokens with every site prefetching
as with none.

    python3 -m pytest -q tests/gpu/test_l2_prefetch_gpu.py
"""
from __future__ import annotations

import json

import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.kernels import l2_prefetch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                                 reason="needs a CUDA GPU of compute capability 9.0 or newer")]

SMALL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 512, "intermediate_size": 1536,
         "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
ALL = {site: 1 << 40 for site in l2_prefetch.PREFETCH_SITES}
OFF = {site: 0 for site in l2_prefetch.PREFETCH_SITES}


@pytest.fixture(autouse=True)
def _prefetches_off_after():
    yield
    l2_prefetch.set_l2_prefetch(**OFF)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_the_kernel_runs_and_leaves_the_weight(dtype):
    weight = torch.randn(3000, 1000, device="cuda").to(dtype)
    before = weight.view(torch.uint8).clone()
    l2_prefetch.set_l2_prefetch(o_proj=1 << 40)
    assert l2_prefetch.prefetch_bytes("o_proj", weight, 1) == weight.numel() * weight.element_size() // 16384 * 16384
    l2_prefetch.prefetch_weight("o_proj", weight, 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        l2_prefetch.prefetch_weight("o_proj", weight, 1)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(weight.view(torch.uint8), before)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_decoding_with_prefetches_gives_the_same_tokens(quantization, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    prompts = [[3 + i, 40 + 7 * i, 9, 100 + i] for i in range(4)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    tokens = []
    for sites in (OFF, ALL):
        l2_prefetch.set_l2_prefetch(**sites)
        llm = LLM(str(tmp_path), load_format="random", skip_tokenizer_init=True, max_model_len=256,
                  max_batch_size=16, gpu_memory_utilization=0.2, seed=0,
                  **({"quantization": quantization} if quantization else {}))
        try:
            tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)]
                          + [llm.generate([prompts[0]], params)[0].outputs[0].token_ids])  # batch 1
        finally:
            llm.shutdown()
    assert tokens[0] == tokens[1]
    assert all(len(t) == 24 for t in tokens[0])
