"""Rope scaling against transformers: the frequencies of each type, config.json's forms of it, the
context length it gives, and whole tiny models generating past their original context."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from meshlm import LLM, SamplingParams  # noqa: E402
from meshlm.config import EngineArgs, EngineConfig  # noqa: E402
from meshlm.kernels.attention import RotaryEmbedding  # noqa: E402
from meshlm.kernels.rope_scaling import rope_inv_freq  # noqa: E402
from meshlm.weights.model_config import ModelConfig  # noqa: E402
from tests.model_factory import load_reference, make_random_model, random_prompts, reference_greedy  # noqa: E402

HEAD_DIM, THETA = 64, 10000.0
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_untruncated_betas": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64,
                               "beta_fast": 16, "beta_slow": 2, "truncate": False},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                    "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "attention_factor": 1.5},
}
MAX_POSITIONS = 64


def hf_config(scaling: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, head_dim=HEAD_DIM,
                       max_position_embeddings=MAX_POSITIONS,
                       rope_parameters={**scaling, "rope_theta": THETA})


@pytest.mark.parametrize("name", SCALINGS)
def test_frequencies_and_attention_factor_are_transformers(name):
    scaling = SCALINGS[name]
    config = hf_config(scaling)
    # dynamic: transformers' frequencies at the model's longest context, factor x max positions
    seq_len = int(scaling["factor"] * MAX_POSITIONS) if name == "dynamic" else None
    expected, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, torch.device("cpu"), seq_len)
    ours = ModelConfig.from_hf_dict({**config.to_dict(), "architectures": ["LlamaForCausalLM"]}).rope_scaling
    inv_freq, factor = rope_inv_freq(HEAD_DIM, THETA, ours)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)
    assert not torch.equal(inv_freq, rope_inv_freq(HEAD_DIM, THETA, None)[0])  # the scaling does something


def test_yarn_attention_factor_scales_cos_and_sin():
    scaling = {**SCALINGS["yarn_attention_factor"]}
    plain = RotaryEmbedding(HEAD_DIM, 100, THETA, {**scaling, "attention_factor": 1.0}, torch.device("cpu"))
    scaled = RotaryEmbedding(HEAD_DIM, 100, THETA, scaling, torch.device("cpu"))
    torch.testing.assert_close(scaled.cos, plain.cos * 1.5)
    torch.testing.assert_close(scaled.sin, plain.sin * 1.5)


def _arch(**hf) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, **hf}


@pytest.mark.parametrize("hf,expected_scaling,expected_len", [
    # older configs: rope_scaling with "type"
    (_arch(max_position_embeddings=4096, rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0}),
     {"rope_type": "linear", "factor": 2.0}, 8192),
    # transformers 5: rope_parameters holding the theta
    (_arch(max_position_embeddings=4096, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500.0}),
     {"rope_type": "dynamic", "factor": 4.0}, 16384),
    # yarn without its original length: max_position_embeddings; the context is factor x that
    (_arch(max_position_embeddings=32768, rope_theta=500.0, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    # a top-level original length wins over the dict's (Phi-3's habit, which transformers keeps)
    (_arch(max_position_embeddings=131072, rope_theta=500.0, original_max_position_embeddings=8192,
           rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4096}),
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, 131072),
    (_arch(max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 500.0}), None, 2048),
])
def test_config_forms(hf, expected_scaling, expected_len):
    cfg = ModelConfig.from_hf_dict(hf)
    assert cfg.rope_theta == 500.0
    assert cfg.rope_scaling == expected_scaling
    assert cfg.derived_max_model_len == expected_len


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match=r"unsupported rope_type 'longrope'.*linear, dynamic, yarn, llama3"):
        ModelConfig.from_hf_dict(_arch(max_position_embeddings=64, rope_scaling={"rope_type": "longrope"}))


def test_max_model_len_defaults_to_and_stops_at_the_scaled_context():
    cfg = ModelConfig.from_hf_dict(_arch(max_position_embeddings=4096, rope_theta=500.0,
                                         rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert EngineConfig.for_random_weights(cfg, device="cpu").max_model_len == 32768
    assert EngineConfig.for_random_weights(cfg, device="cpu", max_model_len=32768).max_model_len == 32768
    with pytest.raises(ValueError) as err:
        EngineConfig.for_random_weights(cfg, device="cpu", max_model_len=32769)
    for text in ("max_model_len=32769", "context of 32768", "max_position_embeddings=4096", "linear factor 8.0",
                 "at most 32768"):
        assert text in str(err.value)


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                     {"rope_type": "linear", "factor": 4.0}], ids=["yarn", "linear"])
def test_generation_past_the_original_context_matches_transformers(scaling, tmp_path):
    max_positions = 128 if scaling["rope_type"] == "yarn" else 32
    path = make_random_model(tmp_path, "llama", seed=5, num_hidden_layers=2, rope_scaling=scaling,
                             max_position_embeddings=max_positions)
    hf_model = load_reference(path)
    prompt = random_prompts(320, [100], seed=3)[0]  # positions 0..107 cross the original 32
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    with LLM(str(path), dtype="float32", num_kv_blocks=16, block_size=16) as llm:
        assert llm.engine_core.max_model_len == 128  # the scaled context, by default
        completion = llm.generate([prompt], params)[0].outputs[0]
    tokens, logprobs = reference_greedy(hf_model, prompt, 8)
    assert completion.token_ids == tokens
    got = torch.tensor([entry[token] for entry, token in zip(completion.logprobs, tokens)])
    torch.testing.assert_close(got, logprobs[torch.arange(8), torch.tensor(tokens)], atol=1e-4, rtol=0)
