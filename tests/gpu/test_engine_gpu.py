"""The engine on a GPU (Triton attention, decode CUDA graphs) against the CPU reference path and
transformers on the same random weights."""
from __future__ import annotations

import pytest
import torch

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[5, 17, 33, 91, 4], list(range(10, 80)), [7] * 23, list(range(100, 300, 3))]
STEPS = 24


def _run(path, device, dtype, **kwargs):
    llm = LLM(str(path), device=device, dtype=dtype, block_size=16, max_model_len=512, num_kv_blocks=512, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, params)
    engine = llm.local_model_runner()
    replays = engine.graph_runner.num_replays if engine.graph_runner is not None else 0
    llm.shutdown()
    return [o.outputs[0] for o in outs], replays


@pytest.fixture(scope="module", params=["llama", "qwen3", "mistral"])
def model_dir(request, tmp_path_factory):
    overrides = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    if request.param == "qwen3":
        overrides["head_dim"] = 64
    return make_random_model(tmp_path_factory.mktemp(request.param), request.param, weight_std=0.2, **overrides)


def test_gpu_fp32_matches_cpu_reference(model_dir):
    cpu, _ = _run(model_dir, "cpu", "float32")
    gpu, replays = _run(model_dir, "cuda", "float32")
    assert replays > 0, "decode steps did not use the CUDA graphs"
    for c, g in zip(cpu, gpu):
        assert g.token_ids == c.token_ids
        for step_c, step_g in zip(c.logprobs, g.logprobs):
            shared = [t for t in step_c if t in step_g]
            assert len(shared) >= 4
            for token in shared:
                assert abs(step_g[token] - step_c[token]) < 2e-3


def test_gpu_bf16_agrees_with_fp32(model_dir):
    ref, _ = _run(model_dir, "cpu", "float32")
    bf16, _ = _run(model_dir, "cuda", "bfloat16")
    first_agree = sum(r.token_ids[0] == b.token_ids[0] for r, b in zip(ref, bf16))
    assert first_agree == len(PROMPTS)
    errors = [abs(b.logprobs[0][t] - lp) for r, b in zip(ref, bf16) for t, lp in r.logprobs[0].items()
              if t in b.logprobs[0]]
    # bf16 rounding through the layers (transformers' own bf16 drifts as much); a wrong attention
    # or a misloaded weight gives errors of whole units.
    assert max(errors) < 0.5, max(errors)


def test_eager_and_graph_decode_agree(model_dir):
    graphs, replays = _run(model_dir, "cuda", "float32")
    eager, none = _run(model_dir, "cuda", "float32", enable_cuda_graphs=False)
    assert replays > 0 and none == 0
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
