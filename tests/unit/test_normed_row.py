"""A one-row decode step's norms handed unevaluated to the products after them (fp8.NormedRow):
the model's plumbing on the CPU. There the product computes the norm first (the GPU's one-row
kernel computes it as it loads the row: tests/gpu/test_gemv_kernel.py), so with the hand-over
forced on, every decode step of one sequence takes it and the tokens and logprobs are exactly
those of the model without it; the residual stream the products write is the one the next layer
reads."""
from __future__ import annotations

import pytest

from meshlm import LLM, SamplingParams
from meshlm.kernels import fp8
from meshlm.weights.model_config import ModelConfig
from tests.model_factory import make_random_model, make_random_moe_model, random_prompts

pytestmark = pytest.mark.timeout(120)

NUM_STEPS = 6
ENGINE_KW = dict(num_kv_blocks=32, block_size=16, max_model_len=128, dtype="float32")


def _generate(path, prompt, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_STEPS, ignore_eos=True, logprobs=5)
    with LLM(str(path), **ENGINE_KW, **kw) as llm:
        return llm.generate([prompt], params)[0].outputs[0]


@pytest.mark.parametrize("family, quantization", [("llama", None), ("qwen2", "fp8"), ("mixtral", None)])
def test_one_row_steps_hand_their_norms_to_the_products(family, quantization, tmp_path, monkeypatch):
    """Qwen2: the qkv product adds a bias; FP8: the weight-only product; Mixtral: the attention
    takes the norm, the experts never (the router reads the normed row)."""
    make = make_random_moe_model if family == "mixtral" else make_random_model
    base = make(tmp_path / family, family, seed=3)
    prompt = random_prompts(320, (7,), seed=2)[0]
    plain = _generate(base, prompt, quantization=quantization)
    handed = []
    real = fp8.normed_row_linear

    def counting(x, *args, **kwargs):
        handed.append((x.residual is None, x.summed is None))
        return real(x, *args, **kwargs)

    monkeypatch.setattr("meshlm.parallel.layers.takes_normed_row", lambda num_rows, *args: num_rows == 1)
    monkeypatch.setattr(fp8, "normed_row_linear", counting)
    fused = _generate(base, prompt, quantization=quantization)
    num_layers = ModelConfig.from_dir(base).num_layers
    per_step = num_layers * (1 if family == "mixtral" else 2)
    # every decode step (the first token comes from the prefill) hands over each layer's norms;
    # only the first layer's input norm has no residual to add
    assert len(handed) == (NUM_STEPS - 1) * per_step
    assert handed.count((True, True)) == NUM_STEPS - 1 and handed.count((False, False)) == len(handed) - (NUM_STEPS - 1)
    assert fused.token_ids == plain.token_ids
    assert fused.logprobs == plain.logprobs
