"""``kv_cache_dtype="fp8"``: the float8 e4m3 KV pool, its scales, and its effect on outputs and sizes.

- Quantizing: values divided by their head's scale, rounded to e4m3 (within half a step), clamped
  to +-448; the torch write path stores exactly that.
- The reference attention over an fp8 pool is the attention over its dequantized fp32 values.
- The engine with an fp8 pool against transformers whose attention sees its keys and values
  rounded through e4m3 the same way (fp32, CPU), with scales from the checkpoint or without.
- Twice the tokens in the same memory (four times against an fp32 model), on the CPU pool, the
  GPU pool arithmetic and the automatic max_batch_size.
"""
from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from meshlm import LLM, SamplingParams  # noqa: E402
from meshlm.api.plan import plan_layout  # noqa: E402
from meshlm.config import CacheConfig, EngineArgs, EngineConfig  # noqa: E402
from meshlm.executor import memory  # noqa: E402
from meshlm.executor.model_runner import ModelRunner  # noqa: E402
from meshlm.kernels.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from meshlm.kernels.fused_ops import write_kv_cache  # noqa: E402
from meshlm.kernels.kv_quant import FP8_KV_DTYPE, dequantize_kv, quantize_kv  # noqa: E402
from meshlm.parallel.groups import ParallelGroups  # noqa: E402
from meshlm.parallel.kv_scales import KVCacheScales  # noqa: E402
from meshlm.parallel.mapping import Mapping  # noqa: E402
from meshlm.weights.checkpoint import CheckpointError, CheckpointReader  # noqa: E402
from meshlm.weights.model_config import ModelConfig  # noqa: E402
from tests.model_factory import load_reference, make_random_model, random_prompts, reference_greedy  # noqa: E402
from tests.rank_groups import RankComm, rank_groups  # noqa: E402

E4M3_HALF_STEP = 2.0 ** -4  # 3 mantissa bits: rounding moves a normal value by at most 1/16 of it
E4M3_MIN_NORMAL = 2.0 ** -6
NUM_STEPS = 16
# The engine and transformers compute each key and value in fp32 in a different order (~1e-6
# apart); a value that falls that close to the midpoint of two e4m3 numbers rounds one way in one
# and the other way in the other, which moves a logprob by ~1e-4. Without such ties they agree to
# ~1e-5; the fp32 pool differs from the fp8 one by 0.1 to 1 on these models (checked below).
ATOL = 1e-3
ENGINE_KW = dict(num_kv_blocks=64, block_size=16, max_model_len=256, dtype="float32", kv_cache_dtype="fp8")


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- quantizing and the reference attention ---------------------------------------------------

def test_quantize_rounds_to_e4m3_within_half_a_step_and_clamps():
    scale = torch.tensor([0.5, 2.0])
    x = _randn(64, 2, 16, scale=100.0)  # some beyond 448 * 0.5 = 224
    stored = quantize_kv(x, scale)
    assert stored.dtype == FP8_KV_DTYPE and stored.element_size() == 1 and stored.shape == x.shape
    back = dequantize_kv(stored, scale)  # [64, 2, 16] fp32
    limit = 448.0 * scale[None, :, None]
    inside = x.abs() <= limit
    bound = E4M3_HALF_STEP * x.abs() + E4M3_MIN_NORMAL * E4M3_HALF_STEP * scale[None, :, None]
    assert ((back - x).abs() <= bound)[inside].all()
    assert bool((~inside).any()), "the case must reach past the range"
    assert torch.equal(back[~inside], (torch.sign(x) * limit).expand_as(x)[~inside])


def test_write_kv_cache_stores_the_quantized_values_at_their_slots():
    num_kv_heads, head_dim = 2, 8
    k_cache = torch.zeros(4, 4, num_kv_heads, head_dim, dtype=FP8_KV_DTYPE)
    v_cache = torch.zeros_like(k_cache)
    k, v = _randn(3, num_kv_heads, head_dim, seed=1, scale=5), _randn(3, num_kv_heads, head_dim, seed=2, scale=5)
    k_scale, v_scale = torch.tensor([0.25, 1.0]), torch.tensor([2.0, 0.5])
    slots = torch.tensor([13, 2, 7])
    write_kv_cache(k_cache, v_cache, k, v, slots, k_scale, v_scale)
    flat_k = k_cache.view(-1, num_kv_heads, head_dim).float()
    flat_v = v_cache.view(-1, num_kv_heads, head_dim).float()
    assert torch.equal(flat_k[slots], quantize_kv(k, k_scale).float())
    assert torch.equal(flat_v[slots], quantize_kv(v, v_scale).float())
    others = torch.ones(16, dtype=torch.bool)
    others[slots] = False
    assert not flat_k[others].any() and not flat_v[others].any()


def _decode_and_prefill_case(num_kv_heads=2, group=3, head_dim=16, block_size=4, seed=0):
    """A decode of a 13-token sequence and a 6-token chunk after 5 cached tokens, fp32 KV."""
    num_blocks = 12
    tables = torch.tensor([[7, 2, 9, 0], [4, 11, 1, 5]], dtype=torch.int32)
    query_lens, seq_lens = np.array([1, 6]), np.array([13, 11])
    positions = np.concatenate([[12], np.arange(5, 11)])
    meta = AttentionMetadata(
        positions=torch.from_numpy(positions), slot_mapping=torch.zeros(7, dtype=torch.int64),
        query_start_loc=torch.tensor([0, 1, 7], dtype=torch.int32),
        seq_lens=torch.from_numpy(seq_lens).int(), block_tables=tables, max_query_len=6, max_seq_len=13,
        query_lens_host=query_lens)
    q = _randn(7, num_kv_heads * group, head_dim, seed=seed)
    k = _randn(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 1, scale=3)
    v = _randn(num_blocks, block_size, num_kv_heads, head_dim, seed=seed + 2, scale=3)
    return q, k, v, meta


def test_reference_attention_over_fp8_is_attention_over_the_dequantized_values():
    q, k, v, meta = _decode_and_prefill_case()
    k_scale, v_scale = torch.tensor([0.05, 0.1]), torch.tensor([0.1, 0.05])  # ranges +-22 and more: no clamping
    k8, v8 = quantize_kv(k.flatten(0, 1), k_scale).view(k.shape), quantize_kv(v.flatten(0, 1), v_scale).view(v.shape)
    got = paged_attention_reference(q, k8, v8, meta, 0.25, None, k_scale, v_scale)
    dequantized = paged_attention_reference(q, dequantize_kv(k8, k_scale), dequantize_kv(v8, v_scale), meta, 0.25)
    torch.testing.assert_close(got, dequantized, atol=1e-6, rtol=0)
    exact = paged_attention_reference(q, k, v, meta, 0.25)
    error = (got - exact).abs()
    # Within a few percent of the outputs' size (each K and V element moved by <= 1/16), not equal.
    assert 0 < float(error.max()) < 0.1 * float(exact.abs().max())
    # The scales are applied: read with scale 1 the same bytes give another result.
    ones = torch.ones(2)
    assert not torch.allclose(paged_attention_reference(q, k8, v8, meta, 0.25, None, ones, ones), got, atol=1e-2)


# --- the engine against transformers with e4m3-rounded keys and values ------------------------------

def _register_fp8_attention(name: str, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
    """transformers' eager attention over keys and values rounded through e4m3 with these scales
    [num_kv_heads] (as kernels/kv_quant.py stores them), under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def rounded(x, scale):  # x: [batch, num_kv_heads, seq, head_dim]
        s = scale[None, :, None, None]
        return (x / s).clamp(-448.0, 448.0).to(FP8_KV_DTYPE).float() * s

    def attention(module, query, key, value, attention_mask, **kwargs):
        return eager_attention_forward(module, query, rounded(key, k_scale), rounded(value, v_scale),
                                       attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)


def _worst_logprob_error(outputs, reference, prompts) -> tuple[bool, float]:
    """(every prompt's tokens equal the reference's, the largest top-20 logprob difference)."""
    tokens_equal, worst = True, 0.0
    for prompt, output in zip(prompts, outputs):
        tokens, logprobs = reference_greedy(reference, prompt, NUM_STEPS)
        completion = output.outputs[0]
        tokens_equal &= completion.token_ids == tokens
        for step, entry in enumerate(completion.logprobs):
            ids, values = torch.tensor(list(entry)), torch.tensor(list(entry.values()))
            worst = max(worst, float((values - logprobs[step][ids]).abs().max()))
    return tokens_equal, worst


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_fp8_engine_matches_transformers_with_rounded_kv(family, tmp_path):
    path = make_random_model(tmp_path / family, family, seed=0)
    prompts = random_prompts(320, (5, 19, 37), seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_STEPS, ignore_eos=True, logprobs=20)
    with LLM(str(path), **ENGINE_KW) as llm:
        assert llm.local_model_runner().kv_caches[0][0].dtype == FP8_KV_DTYPE
        outputs = llm.generate(prompts, params)
    reference = load_reference(path)
    exact = _worst_logprob_error(outputs, reference, prompts)
    _register_fp8_attention("meshlm_fp8_kv", torch.ones(2), torch.ones(2))
    reference.set_attn_implementation("meshlm_fp8_kv")
    tokens_equal, worst = _worst_logprob_error(outputs, reference, prompts)
    assert tokens_equal and worst < ATOL, f"{family}: {worst}"
    assert exact[1] > 10 * ATOL, f"{family}: the fp8 pool should differ from fp32 attention ({exact[1]})"


def _add_kv_scales(src, dst, k_scale: torch.Tensor, v_scale: torch.Tensor, v_name: str):
    """A copy of the model ``src`` whose every layer has these KV-cache scales."""
    from safetensors.torch import load_file, save_file
    path = shutil.copytree(src, dst)
    tensors = load_file(path / "model.safetensors")
    for layer in range(3):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = k_scale.clone()
        tensors[f"model.layers.{layer}.self_attn.{v_name}"] = v_scale.clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_checkpoint_scales_are_used_per_head(tmp_path):
    """Per-head key scales and a per-tensor value scale (older compressed-tensors name); one
    head's key scale is small enough that its largest keys are clamped."""
    model = make_random_model(tmp_path / "llama", "llama", seed=5)
    k_scale, v_scale = torch.tensor([0.02, 0.005]), torch.tensor(0.03)
    path = _add_kv_scales(model, tmp_path / "scaled", k_scale.view(2, 1, 1), v_scale, "v_proj.output_scale")
    prompts = random_prompts(320, (9, 30), seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_STEPS, ignore_eos=True, logprobs=20)
    with LLM(str(path), **ENGINE_KW) as llm:
        attention = llm.local_model_runner().model.attention_layers[1]
        assert torch.equal(attention.kv_scales.k_scale, k_scale)
        assert torch.equal(attention.kv_scales.v_scale, torch.full((2,), 0.03))
        outputs = llm.generate(prompts, params)
    reference = load_reference(model)
    _register_fp8_attention("meshlm_fp8_kv_scaled", k_scale, v_scale.expand(2))
    reference.set_attn_implementation("meshlm_fp8_kv_scaled")
    tokens_equal, worst = _worst_logprob_error(outputs, reference, prompts)
    assert tokens_equal and worst < ATOL, worst
    _register_fp8_attention("meshlm_fp8_kv_unscaled", torch.ones(2), torch.ones(2))
    reference.set_attn_implementation("meshlm_fp8_kv_unscaled")
    assert _worst_logprob_error(outputs, reference, prompts)[1] > 10 * ATOL


# --- checkpoint scales, sharded with the KV heads -------------------------------------------------

def _scales(tmp_path, tensors: dict, tp: int, rank: int, num_kv_heads: int = 4) -> KVCacheScales:
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "model.safetensors")
    scales = KVCacheScales(num_kv_heads, RankComm(rank, tp))
    scales.load(CheckpointReader(tmp_path), "model.layers.0")
    return scales


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_per_head_scales_follow_each_ranks_kv_heads(tmp_path, tp):
    """4 KV heads: tp 2 gives each rank two, tp 8 one replicated head per pair of ranks."""
    k_scale, v_scale = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor(0.5)  # per head [4, 1, 1], per tensor []
    tensors = {"model.layers.0.self_attn.k_scale": k_scale.view(4, 1, 1),
               "model.layers.0.self_attn.v_scale": v_scale}
    for rank in range(tp):
        scales = _scales(tmp_path, tensors, tp, rank)
        heads = [rank * 4 // tp] if tp > 4 else list(range(rank * 4 // tp, (rank + 1) * 4 // tp))
        assert torch.equal(scales.k_scale, k_scale[heads]), (tp, rank)
        assert torch.equal(scales.v_scale, torch.full((len(heads),), 0.5)), (tp, rank)


def test_older_scale_names_and_absent_scales(tmp_path):
    scales = _scales(tmp_path, {"model.layers.0.self_attn.kv_scale": torch.tensor([0.25])}, 1, 0)
    assert torch.equal(scales.k_scale, torch.full((4,), 0.25)) and torch.equal(scales.v_scale, scales.k_scale)
    scales = _scales(tmp_path, {"model.layers.0.self_attn.k_proj.output_scale": torch.tensor([2.0]),
                                "model.layers.0.mlp.down_proj.weight": torch.ones(1)}, 1, 0)
    assert torch.equal(scales.k_scale, torch.full((4,), 2.0)) and torch.equal(scales.v_scale, torch.ones(4))


@pytest.mark.parametrize("value,message", [
    (torch.ones(3), r"'model.layers.0.self_attn.k_scale' has shape \[3\] \(3 values\); expected one value, or "
                    r"one per KV head \(num_kv_heads=4\)"),
    (torch.tensor([0.0]), r"'model.layers.0.self_attn.k_scale' holds \[0.0\]; scales must be finite and > 0"),
])
def test_bad_scales_are_named(tmp_path, value, message):
    with pytest.raises(CheckpointError, match=message):
        _scales(tmp_path, {"model.layers.0.self_attn.k_scale": value}, 1, 0)


# --- twice the tokens in the same memory ---------------------------------------------------------

_CFG = ModelConfig("LlamaForCausalLM", vocab_size=100, hidden_size=72, intermediate_size=144, num_layers=3,
                   num_heads=9, num_kv_heads=3, head_dim=8, max_position_embeddings=64)


def _runner(dtype: str, kv_cache_dtype: str, mapping=Mapping(1, 0), **kwargs) -> ModelRunner:
    config = EngineConfig.for_random_weights(_CFG, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_model_len=64,
                                             tensor_parallel_size=mapping.tp, **kwargs)
    return ModelRunner(config, rank_groups(mapping) if mapping.world_size > 1 else ParallelGroups.single(),
                       torch.device("cpu"))


@pytest.mark.parametrize("dtype,factor", [("bfloat16", 2), ("float32", 4)])
def test_the_cpu_pool_holds_more_blocks_and_takes_one_byte_per_element(dtype, factor):
    cache = CacheConfig(cpu_kv_cache_gb=0.001)
    model_pool = _runner(dtype, "auto").available_kv_blocks(cache, 256, 8)
    runner = _runner(dtype, "fp8")
    fp8_pool = runner.available_kv_blocks(cache, 256, 8)
    assert factor * model_pool <= fp8_pool < factor * (model_pool + 1)
    runner.allocate_kv_cache(5, 16)
    assert {t.dtype for kv in runner.kv_caches for t in kv} == {FP8_KV_DTYPE}
    pool_bytes = sum(t.numel() * t.element_size() for kv in runner.kv_caches for t in kv)
    assert pool_bytes == memory.kv_bytes_per_token(_CFG, Mapping(1, 0), 1) * 6 * 16  # one scratch block


def test_the_gpu_pool_and_the_plan_hold_twice_the_tokens(monkeypatch):
    mapping, total = Mapping(3, 1, tp=3), 3 * 2**30
    pools = {}
    for kv_dtype in ("auto", "fp8"):
        runner = _runner("bfloat16", kv_dtype, mapping)
        weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - weights, total))
        runner.device = torch.device("cuda")  # sizes the pool only; nothing runs on it
        cache = CacheConfig(block_size=16, gpu_memory_utilization=0.5, cache_dtype=kv_dtype)
        plan = memory.plan_rank(_CFG, mapping, 2, total, cache, max_num_tokens=512, max_batch_size=8)
        assert runner.available_kv_blocks(cache, 512, 8) == plan.num_blocks
        pools[kv_dtype] = plan.num_blocks + 1  # the blocks of the budget, scratch block included
    assert 2 * pools["auto"] <= pools["fp8"] <= 2 * pools["auto"] + 1


def test_auto_max_batch_size_doubles(tmp_path):
    import json
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=2048, intermediate_size=5632,
              num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
              torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    plans = {kv: plan_layout(EngineArgs(model=str(tmp_path), kv_cache_dtype=kv), 8 * 2**30) for kv in ("auto", "fp8")}
    auto, fp8 = plans["auto"].max_batch_size, plans["fp8"].max_batch_size
    assert 16 < auto < 1024, auto  # neither bound of auto_max_batch_size decides it
    assert 2 * auto <= fp8 <= 2 * auto + 16, (auto, fp8)
    assert plans["fp8"].ranks[0].kv_bytes_per_token * 2 == plans["auto"].ranks[0].kv_bytes_per_token


# --- configuration ---------------------------------------------------------------------------------

def test_kv_cache_dtype_is_checked_and_travels_on_the_command_line():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e5m2'; choose one of auto, fp8, fp8_e4m3"):
        EngineArgs(kv_cache_dtype="fp8_e5m2")
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli(parser.parse_args(["--kv-cache-dtype", "fp8_e4m3"]))
    assert args.kv_cache_dtype == "fp8_e4m3" and args.cache_config().cache_dtype == "fp8_e4m3"
    assert args.to_cli() == ["--kv-cache-dtype", "fp8_e4m3"]
    assert EngineArgs().kv_cache_dtype == "auto"
