"""The torch ops (the default path) against transformers' own code, the decoder's split residual
stream against the plain ``h = h + block(norm(h))`` form, and the wiring of ``enable_fused_kernels``.

The Triton kernels themselves are checked against these ops in tests/gpu/test_fused_ops_gpu.py (and test_fused_ops_fp8_gpu.py).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb  # noqa: E402

from meshlm.parallel.groups import ParallelGroups  # noqa: E402
from meshlm.parallel.layers import RMSNorm  # noqa: E402
from meshlm.kernels.attention import AttentionMetadata, RotaryEmbedding  # noqa: E402
from meshlm.config import EngineArgs, EngineConfig  # noqa: E402
from meshlm.executor.model_runner import ModelRunner  # noqa: E402
from meshlm.kernels.fused_ops import TORCH_OPS, TorchOps, select_ops  # noqa: E402
from tests.model_factory import make_random_model  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _hf_norm(weight: torch.Tensor, eps: float) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(weight.shape[0], eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


# --- each op against transformers ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (3, 4, 24)])
def test_rms_norm_is_transformers_rms_norm(dtype, shape):
    x = _randn(*shape, dtype=dtype, scale=3.0)
    weight = _randn(shape[-1], dtype=dtype, seed=1)
    with torch.no_grad():
        expected = _hf_norm(weight, EPS)(x)
    got = TORCH_OPS.rms_norm(x, weight, EPS)
    assert got.dtype == dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_normalises_the_sum_and_returns_it(dtype):
    x, residual = _randn(7, 128, dtype=dtype), _randn(7, 128, dtype=dtype, seed=2, scale=4.0)
    weight = _randn(128, dtype=dtype, seed=1)
    normed, new_residual = TORCH_OPS.add_rms_norm(x, residual, weight, EPS)
    summed = residual + x  # the decoder's old order: stream + block output
    assert torch.equal(new_residual, summed)
    with torch.no_grad():
        assert torch.equal(normed, _hf_norm(weight, EPS)(summed))


def test_add_rms_norm_without_residual_passes_the_input_through_uncopied():
    x, weight = _randn(5, 64), _randn(64, seed=1)
    normed, residual = TORCH_OPS.add_rms_norm(x, None, weight, EPS)
    assert residual is x
    with torch.no_grad():
        assert torch.equal(normed, _hf_norm(weight, EPS)(x))


def test_rms_norm_module_forward_and_add_norm():
    norm = RMSNorm(64, EPS, torch.float32)
    with torch.no_grad():
        norm.weight.copy_(_randn(64, seed=3))
    x, residual = _randn(4, 64), _randn(4, 64, seed=4)
    with torch.no_grad():
        hf = _hf_norm(norm.weight.detach(), EPS)
        assert torch.equal(norm(x), hf(x))
        normed, summed = norm.add_norm(x, residual)
        assert torch.equal(summed, x + residual) and torch.equal(normed, hf(x + residual))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (7, 352), (64, 128)])
def test_silu_and_mul_is_silu_of_gate_times_up(dtype, num_tokens, inter):
    gate, up = _randn(num_tokens, inter, dtype=dtype, scale=3.0), _randn(num_tokens, inter, dtype=dtype, seed=1)
    got = TORCH_OPS.silu_and_mul(torch.cat([gate, up], dim=-1))
    assert got.shape == (num_tokens, inter) and got.dtype == dtype
    # transformers' MLP: act_fn(gate_proj(x)) * up_proj(x), act_fn = nn.SiLU
    assert torch.equal(got, torch.nn.SiLU()(gate) * up)


def _qk_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q and k as the attention layer has them: strided views of one merged qkv row."""
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, scale=2.0)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (8, 2, 128), (9, 3, 24)])
def test_rotary_is_transformers_rotary(dtype, num_heads, num_kv_heads, head_dim):
    num_tokens = 7
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    rotary = RotaryEmbedding(head_dim, 200, 10000.0, scaling, torch.device("cpu"))
    q, k = _qk_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    positions = torch.tensor([0, 1, 5, 31, 32, 120, 199])
    got_q, got_k = rotary(positions, q, k)
    assert got_q.dtype == dtype and got_k.dtype == dtype
    # transformers' layout: cos/sin [tokens, head_dim] (the half tables twice), broadcast over heads.
    cos = torch.cat([rotary.cos[positions]] * 2, dim=-1)
    sin = torch.cat([rotary.sin[positions]] * 2, dim=-1)
    # In fp32 the same products and sums in the same order; meshlm rounds 16-bit types once, at the end.
    exp_q, exp_k = apply_rotary_pos_emb(q.float(), k.float(), cos, sin, unsqueeze_dim=1)
    assert torch.equal(got_q, exp_q.to(dtype)) and torch.equal(got_k, exp_k.to(dtype))


# --- the decoder's residual stream ------------------------------------------------------------------

def _prefill_meta(num_tokens: int, block_size: int) -> AttentionMetadata:
    num_blocks = -(-num_tokens // block_size)
    return AttentionMetadata(
        positions=torch.arange(num_tokens), slot_mapping=torch.arange(num_tokens),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None], max_query_len=num_tokens,
        max_seq_len=num_tokens, query_lens_host=np.array([num_tokens]))


def _make_engine(path, dtype="float32", **kwargs) -> ModelRunner:
    config = EngineConfig.from_args(EngineArgs(str(path), dtype=dtype, max_model_len=64, **kwargs))
    engine = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
    engine.allocate_kv_cache(8, 4)
    return engine


def _plain_forward(model, hidden, meta, kv_caches):
    """The decoder as ``h = h + attn(norm(h)); h = h + mlp(norm(h))``, one tensor for the stream."""
    for layer, kv in zip(model.layers.values(), kv_caches):
        hidden = hidden + layer.self_attn(layer.input_layernorm(hidden), meta, kv)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_path(request, tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp(request.param), request.param, seed=5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_split_residual_stream_is_bitwise_the_plain_one(model_path, dtype):
    engine = _make_engine(model_path, dtype)
    model = engine.model
    meta = _prefill_meta(11, 4)
    with torch.inference_mode():
        hidden = model.embed(torch.arange(3, 14))
        got = model(hidden, meta, engine.kv_caches)
        expected = _plain_forward(model, hidden, meta, engine.kv_caches)
    assert got.dtype == getattr(torch, dtype)
    assert torch.equal(got, expected)


class CountingOps(TorchOps):
    """The torch ops, counting the calls of each."""

    def __init__(self):
        self.calls = {"rms_norm": 0, "add_rms_norm": 0, "silu_and_mul": 0, "rotary": 0}

    def rms_norm(self, x, weight, eps):
        self.calls["rms_norm"] += 1
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        self.calls["add_rms_norm"] += 1
        return super().add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, gate_up):
        self.calls["silu_and_mul"] += 1
        return super().silu_and_mul(gate_up)

    def rotary(self, positions, q, k, cos, sin):
        self.calls["rotary"] += 1
        return super().rotary(positions, q, k, cos, sin)


def test_flag_reaches_every_small_op_of_the_model(model_path, monkeypatch):
    """With the flag on, the engine hands the selected ops to every norm, rotary and MLP."""
    counting = CountingOps()
    monkeypatch.setattr("meshlm.executor.model_runner.select_ops",
                        lambda enabled, device: counting if enabled else TORCH_OPS)
    fused = _make_engine(model_path, enable_fused_kernels=True)
    plain = _make_engine(model_path)
    assert fused.model.ops is counting and plain.model.ops is TORCH_OPS
    meta = _prefill_meta(9, 4)
    with torch.inference_mode():
        hidden = fused.model.embed(torch.arange(3, 12))
        got = fused.model.compute_logits(fused.model(hidden, meta, fused.kv_caches))
        expected = plain.model.compute_logits(plain.model(hidden, meta, plain.kv_caches))
    assert torch.equal(got, expected)
    layers = fused.cfg.num_layers
    qk_norms = 2 * layers if fused.cfg.qk_norm else 0
    # TorchOps.add_rms_norm calls rms_norm too; the final norm is one more.
    assert counting.calls == {"add_rms_norm": 2 * layers, "rotary": layers, "silu_and_mul": layers,
                              "rms_norm": 2 * layers + qk_norms + 1}


def test_llm_passes_the_flag_through(model_path, monkeypatch):
    from meshlm import LLM
    counting = CountingOps()
    monkeypatch.setattr("meshlm.executor.model_runner.select_ops",
                        lambda enabled, device: counting if enabled else TORCH_OPS)
    with LLM(str(model_path), enable_fused_kernels=True, device="cpu", num_kv_blocks=16, block_size=4,
             max_model_len=64) as llm:
        assert llm.local_model_runner().model.ops is counting
        llm.generate([[5, 6, 7]])
    assert counting.calls["silu_and_mul"] > 0


def test_select_ops():
    cpu = torch.device("cpu")
    assert select_ops(False, cpu) is TORCH_OPS
    assert select_ops(False, torch.device("cuda", 0)) is TORCH_OPS


def test_fused_kernels_on_the_cpu_fall_back_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="meshlm"):
        ops = select_ops(True, torch.device("cpu"))
    assert type(ops) is TorchOps
    assert "enable_fused_kernels" in caplog.text and "cpu" in caplog.text


def test_fused_engine_on_the_cpu_runs_the_torch_ops(model_path):
    engine = _make_engine(model_path, enable_fused_kernels=True)
    assert type(engine.model.ops) is TorchOps
    assert all(type(layer.mlp.ops) is TorchOps for layer in engine.model.layers.values())
