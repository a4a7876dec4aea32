"""The fused Triton kernels (TritonOps) against the unfused torch ops, inside CUDA graphs, and
through the engine with ``enable_fused_kernels=True``.

Runs on a CUDA GPU. The kernel tests also run on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fused_ops_gpu.py

The interpreter rounds fp32 to bf16 by truncation where the GPU rounds to nearest, so its bf16
tolerance is one bf16 step wider. Its conversion to float8 differs from the GPU's too (ties away
from zero, subnormals flushed, the exponent's carry dropped: tests/gpu/test_fp8_kv_kernels.py), so
the float8 references convert their fp32 values as the kernel's device does (``to_float8``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from meshlm.kernels.attention import RotaryEmbedding  # noqa: E402
from meshlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE  # noqa: E402
from meshlm.kernels.fused_ops import TORCH_OPS, TritonOps  # noqa: E402

from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS

TRITON_OPS = TritonOps()
EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol): fp32 differs by reduction order only; a 16-bit output may land one step apart
# where the fp32 value sits on a rounding boundary (two steps after two roundings).
TOLERANCES = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 1e-5),
              torch.bfloat16: (3.2e-2 if IS_INTERPRETED else 1.6e-2, 1e-5)}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape)
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
def test_add_rms_norm(dtype, num_tokens, hidden):
    # x is a column slice of a wider tensor: rows with a stride, as a sliced projection gives.
    x = randn(num_tokens, hidden + 64, dtype=dtype, scale=2.0)[:, :hidden]
    residual = randn(num_tokens, hidden, dtype=dtype, seed=1, scale=5.0)
    weight = randn(hidden, dtype=dtype, seed=2) + 1
    normed, new_residual = TRITON_OPS.add_rms_norm(x, residual, weight, EPS)
    exp_normed, exp_residual = TORCH_OPS.add_rms_norm(x, residual, weight, EPS)
    if IS_INTERPRETED and dtype == torch.bfloat16:
        assert_close(new_residual, exp_residual, f"residual {dtype} {num_tokens}x{hidden}")
    else:  # the same fp32 sum, rounded the same way
        assert torch.equal(new_residual, exp_residual)
    assert_close(normed, exp_normed, f"normed {dtype} {num_tokens}x{hidden}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_rms_norm_without_residual(dtype, num_tokens):
    x = randn(num_tokens, 4096, dtype=dtype, scale=3.0)
    weight = randn(4096, dtype=dtype, seed=2)
    normed, residual = TRITON_OPS.add_rms_norm(x, None, weight, EPS)
    assert residual is x
    assert_close(normed, TORCH_OPS.rms_norm(x, weight, EPS), f"{dtype}")
    assert_close(TRITON_OPS.rms_norm(x, weight, EPS), TORCH_OPS.rms_norm(x, weight, EPS), f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_view(dtype):
    """Qwen3's qk-norm: [tokens, heads, head_dim] taken out of the merged qkv row."""
    qkv = randn(7, 16 * 128, dtype=dtype)
    q = qkv[:, :8 * 128].view(7, 8, 128)
    weight = randn(128, dtype=dtype, seed=3)
    assert_close(TRITON_OPS.rms_norm(q, weight, EPS), TORCH_OPS.rms_norm(q, weight, EPS), f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 64])
@pytest.mark.parametrize("inter", [64, 1000, 14336])
def test_silu_and_mul(dtype, num_tokens, inter):
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, scale=3.0)
    assert_close(TRITON_OPS.silu_and_mul(gate_up), TORCH_OPS.silu_and_mul(gate_up),
                 f"{dtype} {num_tokens}x{inter}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 2, 24)])
def test_rotary(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, scaling, torch.device(DEVICE))
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, _ = randn(num_tokens, sum(sizes), dtype=dtype, scale=2.0).split(sizes, dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # strided views, as the attention layer has them
    k = k.view(num_tokens, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(4)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    got_q, got_k = TRITON_OPS.rotary(positions, q, k, rotary.cos, rotary.sin)
    exp_q, exp_k = TORCH_OPS.rotary(positions, q, k, rotary.cos, rotary.sin)
    assert_close(got_q, exp_q, f"q {dtype}")
    assert_close(got_k, exp_k, f"k {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 2, 24)])
def test_rotary_and_cache(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    """The fused rotary + KV-cache store against rotary then the two index copies: the rotated q,
    and the whole cache (slots this step does not own must keep their old values)."""
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = randn(num_tokens, sum(sizes), dtype=dtype, scale=2.0).split(sizes, dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # strided views of the merged qkv row
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(5)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    num_blocks, block_size = 9, 16
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=6)
    got_caches, exp_caches = cache.clone(), cache.clone()
    got_q = TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, got_caches[0],
                                        got_caches[1], slots)
    exp_q = TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, exp_caches[0],
                                       exp_caches[1], slots)
    assert_close(got_q, exp_q, f"q {dtype}")
    assert_close(got_caches[0], exp_caches[0], f"k cache {dtype}")
    assert torch.equal(got_caches[1], exp_caches[1]), "values are stored unchanged"
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(got_caches[0].view(-1, num_kv_heads, head_dim)[untouched],
                       cache[0].view(-1, num_kv_heads, head_dim)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache_keeps_the_rotated_keys_when_asked(dtype):
    """With ``k_out`` the fused kernel also stores the rotated keys there (the prefill kernel reads a
    step's own keys from them): against the plain torch rotary, and the cache as without k_out."""
    num_tokens, num_heads, num_kv_heads, head_dim = 7, 9, 3, 64
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = randn(num_tokens, sum(sizes), dtype=dtype, scale=2.0).split(sizes, dim=-1)
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in (q, k, v))  # views of the merged qkv row
    positions = torch.tensor([0, 3, 70, 71, 900, 2048, 4095], device=DEVICE)
    slots = torch.tensor([5, 17, 16, 40, 2, 63, 30], device=DEVICE)
    got = randn(2, 4, 16, num_kv_heads, head_dim, dtype=dtype, seed=3)  # [k and v, blocks, block size, heads, dim]
    expected = got.clone()
    k_out = torch.full((num_tokens, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, got[0], got[1], slots, k_out=k_out)
    TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, expected[0], expected[1], slots)
    assert_close(k_out, TORCH_OPS.rotary(positions, q, k, rotary.cos, rotary.sin)[1], f"k_out {dtype}")
    assert_close(got, expected, f"caches {dtype}")


def test_rotary_and_cache_catches_a_misplaced_slot():
    """The cache comparison can fail: one token stored one slot off is seen."""
    rotary = RotaryEmbedding(64, 128, 10000.0, None, torch.device(DEVICE))
    q, k, v = randn(3, 4, 64), randn(3, 2, 64, seed=1), randn(3, 2, 64, seed=2)
    positions = torch.tensor([0, 5, 9], device=DEVICE)
    got, expected = torch.zeros(2, 4, 16, 2, 64, device=DEVICE), torch.zeros(2, 4, 16, 2, 64, device=DEVICE)
    TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, got[0], got[1],
                                torch.tensor([3, 17, 40], device=DEVICE))
    TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, expected[0], expected[1],
                               torch.tensor([3, 17, 41], device=DEVICE))
    assert not torch.equal(got, expected)


def test_kernels_catch_a_wrong_answer():
    """The comparisons above can fail: a weight off by one part in a thousand is seen."""
    x, weight = randn(7, 256), randn(256, seed=2) + 1
    with pytest.raises(AssertionError):
        assert_close(TRITON_OPS.rms_norm(x, weight * 1.001, EPS), TORCH_OPS.rms_norm(x, weight, EPS), "fp32")


# --- float8 rows for an FP8 product ---------------------------------------------------------------

@triton.jit
def _convert_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + cols, tl.load(x_ptr + cols, mask=cols < n).to(out_ptr.dtype.element_ty), mask=cols < n)


def to_float8(values: torch.Tensor) -> torch.Tensor:
    """fp32 ``values`` (within e4m3's range) rounded to float8 e4m3 as a kernel on this device rounds
    them: torch's conversion on the GPU (round to nearest even, as the GPU's own), in the interpreter
    the interpreter's (module docstring), through a kernel that only converts."""
    if not IS_INTERPRETED:
        return values.to(FP8_DTYPE)
    out = torch.empty(values.shape, dtype=FP8_DTYPE, device=values.device)
    _convert_kernel[(triton.cdiv(values.numel(), 1024),)](values.contiguous(), out, values.numel(), BLOCK=1024)
    return out


def quantize_reference(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-dtype ``rows`` [M, K] quantized per row in plain torch: (float8 [M, K], fp32 scales [M, 1])."""
    scale = (rows.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return to_float8((rows.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX)), scale


def assert_same_float8(got, expected: tuple[torch.Tensor, torch.Tensor], what: str) -> None:
    """Bitwise: the scales, and the float8 bytes."""
    assert got.values.shape == expected[0].shape and got.values.dtype == FP8_DTYPE, (what, got.values.shape)
    assert torch.equal(got.scale, expected[1]), f"{what}: scales"
    assert torch.equal(got.values.view(torch.uint8), expected[0].view(torch.uint8)), f"{what}: float8 bytes"


def signed_codes(q: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 bytes as integers in the order of their values (codes of one sign are monotonic)."""
    codes = q.view(torch.uint8).int()
    return torch.where(codes >= 128, 128 - codes, codes)


def assert_float8_near(got, expected: tuple[torch.Tensor, torch.Tensor], scale_rtol: float, what: str) -> None:
    """Where the model-dtype rows of kernel and torch differ in their last bits (reduction order, exp):
    scales within ``scale_rtol``, each float8 value at most one e4m3 step from torch's, 97 % equal."""
    torch.testing.assert_close(got.scale, expected[1], rtol=scale_rtol, atol=0, msg=lambda m: f"{what}: {m}")
    steps = (signed_codes(got.values) - signed_codes(expected[0])).abs()
    assert int(steps.max()) <= 1, f"{what}: float8 values {int(steps.max())} steps apart"
    assert float((steps == 0).float().mean()) > 0.97, f"{what}: {float((steps == 0).float().mean()):.3f} equal"


# bf16 against torch only on the GPU: the interpreter truncates to bf16 where torch rounds.
NEAR_DTYPES = DTYPES if not IS_INTERPRETED else [torch.float32, torch.float16]


def _norm_inputs(dtype, num_tokens, hidden, has_residual):
    x = randn(num_tokens, hidden + 16, dtype=dtype, scale=2.0)[:, :hidden]  # rows with a stride
    residual = randn(num_tokens, hidden, dtype=dtype, seed=1, scale=5.0) if has_residual else None
    return x, residual, randn(hidden, dtype=dtype, seed=2) + 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (17, 1000)])
@pytest.mark.parametrize("has_residual", [True, False])
def test_add_rms_norm_quantized_is_the_norm_kernel_then_quantization(dtype, num_tokens, hidden, has_residual):
    """The fused kernel against the unfused norm kernel followed by plain-torch quantization: the
    same arithmetic in the same order, so bitwise."""
    x, residual, weight = _norm_inputs(dtype, num_tokens, hidden, has_residual)
    got, got_summed = TRITON_OPS.add_rms_norm_quantized(x, residual, weight, EPS)
    normed, summed = TRITON_OPS.add_rms_norm(x, residual, weight, EPS)
    assert got.dtype == dtype and torch.equal(got_summed, summed)
    assert (got_summed is x) == (not has_residual)
    assert_same_float8(got, quantize_reference(normed), f"{dtype} {num_tokens}x{hidden}")


@pytest.mark.parametrize("dtype", NEAR_DTYPES)
def test_add_rms_norm_quantized_against_torch(dtype):
    x, residual, weight = _norm_inputs(dtype, 17, 1000, True)
    got, got_summed = TRITON_OPS.add_rms_norm_quantized(x, residual, weight, EPS)
    normed, summed = TORCH_OPS.add_rms_norm(x, residual, weight, EPS)
    assert torch.equal(got_summed, summed) or IS_INTERPRETED and dtype == torch.bfloat16
    assert_float8_near(got, quantize_reference(normed), TOLERANCES[dtype][0], f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 64), (17, 1500)])
def test_silu_and_mul_quantized_is_the_kernel_then_quantization(dtype, num_tokens, inter):
    """One program per whole row against the unfused kernel (rows over several programs), then
    plain-torch quantization: bitwise."""
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, scale=3.0)
    got = TRITON_OPS.silu_and_mul_quantized(gate_up)
    assert got.dtype == dtype
    assert_same_float8(got, quantize_reference(TRITON_OPS.silu_and_mul(gate_up)), f"{dtype} {num_tokens}x{inter}")


@pytest.mark.parametrize("width", [1000, 4096, 20000])
def test_row_quantizer_in_one_pass_and_in_pieces(width):
    """The row quantizer (the attention output's, before the output projection): rows up to
    MAX_WHOLE_ROW wide in one pass, wider in two over pieces; both the plain-torch arithmetic, bitwise."""
    from types import SimpleNamespace
    from meshlm.kernels.fp8_quant_triton import MAX_WHOLE_ROW, quantize_rows_triton
    assert (width <= MAX_WHOLE_ROW) == (width < 20000)
    rows = randn(5, width, dtype=torch.bfloat16, scale=3.0)
    rows[0] = 0  # the smallest scale
    values, scale = quantize_rows_triton(rows, FP8_DTYPE, FP8_MAX, MIN_SCALE)
    assert_same_float8(SimpleNamespace(values=values, scale=scale), quantize_reference(rows), f"{width}")


@pytest.mark.parametrize("dtype", NEAR_DTYPES)
def test_silu_and_mul_quantized_against_torch(dtype):
    gate_up = randn(17, 2 * 1500, dtype=dtype, scale=3.0)
    got = TRITON_OPS.silu_and_mul_quantized(gate_up)
    assert_float8_near(got, quantize_reference(TORCH_OPS.silu_and_mul(gate_up)), TOLERANCES[dtype][0], f"{dtype}")


def test_float8_comparisons_catch_a_wrong_answer():
    """The comparisons above can fail: a weight off by one part in a hundred is seen by both."""
    x, residual, weight = _norm_inputs(torch.float32, 17, 1000, True)
    got = TRITON_OPS.add_rms_norm_quantized(x, residual, weight * 1.01, EPS)[0]
    normed = TRITON_OPS.add_rms_norm(x, residual, weight, EPS)[0]
    with pytest.raises(AssertionError):
        assert_same_float8(got, quantize_reference(normed), "bitwise")
    with pytest.raises(AssertionError):
        assert_float8_near(got, quantize_reference(normed), TOLERANCES[torch.float32][0], "near")


@pytest.mark.skipif(not IS_INTERPRETED, reason="on the GPU the engine runs it: tests/gpu/test_fp8_gpu.py")
def test_fp8_model_with_fused_quantization_is_bitwise_the_unfused_model(tmp_path, monkeypatch):
    """A bf16 FP8 Qwen2 (a bias after the qkv product) with TritonOps, one forward of 23 tokens (past the
    weight-only path): the norms and SiLU-and-mul quantizing for the products give the logits of the
    fusion off, bitwise, once the unfused quantization converts to float8 as the interpreter does."""
    from meshlm.config import EngineArgs, EngineConfig
    from meshlm.executor.model_runner import ModelRunner
    from meshlm.kernels import fp8
    from meshlm.kernels.attention import AttentionMetadata
    from meshlm.parallel.groups import ParallelGroups
    from tests.model_factory import make_random_model
    monkeypatch.setattr(fp8, "quantize_with_reciprocal",
                        lambda x, scale: to_float8((x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX)))
    path = make_random_model(tmp_path / "qwen2", "qwen2", seed=5, weight_std=0.05, hidden_size=128,
                             intermediate_size=256)
    config = EngineConfig.from_args(EngineArgs(str(path), dtype="bfloat16", max_model_len=64, quantization="fp8"))
    runner = ModelRunner(config, ParallelGroups.single(), torch.device(DEVICE))
    runner.allocate_kv_cache(8, 4)
    runner.model.use_ops(TRITON_OPS)
    n = 23
    meta = AttentionMetadata(positions=torch.arange(n), slot_mapping=torch.arange(n),
                             query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                             seq_lens=torch.tensor([n], dtype=torch.int32),
                             block_tables=torch.arange(8, dtype=torch.int32)[None], max_query_len=n,
                             max_seq_len=n, query_lens_host=np.array([n]))
    logits = {}
    try:
        for fused in (True, False):
            fp8.set_fused_quantization(fused)
            with torch.inference_mode():
                hidden = runner.model(runner.model.embed(torch.arange(3, 3 + n)), meta, runner.kv_caches)
                logits[fused] = runner.model.compute_logits(hidden)
    finally:
        fp8.set_fused_quantization(True)
    assert torch.equal(logits[True], logits[False])


# --- CUDA graphs ----------------------------------------------------------------------------------

def _layer_ops(ops, x, residual, gate_up, q, k, positions, rotary, weight):
    normed, residual = ops.add_rms_norm(x, residual, weight, EPS)
    q_rot, k_rot = ops.rotary(positions, q, k, rotary.cos, rotary.sin)
    return normed, residual, ops.silu_and_mul(gate_up), q_rot, k_rot


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_replay_in_a_cuda_graph(dtype):
    """Captured once, replayed on new inputs copied into the captured buffers."""
    num_tokens, hidden, inter, num_heads, num_kv_heads, head_dim = 8, 4096, 14336, 32, 8, 128
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    weight = randn(hidden, dtype=dtype, seed=9)

    def inputs(seed):
        return (randn(num_tokens, hidden, dtype=dtype, seed=seed),
                randn(num_tokens, hidden, dtype=dtype, seed=seed + 1),
                randn(num_tokens, 2 * inter, dtype=dtype, seed=seed + 2),
                randn(num_tokens, num_heads, head_dim, dtype=dtype, seed=seed + 3),
                randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=seed + 4),
                torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(seed)).to(DEVICE))

    static = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        _layer_ops(TRITON_OPS, *static, rotary, weight)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _layer_ops(TRITON_OPS, *static, rotary, weight)
    for seed in (10, 20):
        fresh = inputs(seed)
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        expected = _layer_ops(TORCH_OPS, *fresh, rotary, weight)
        for name, got, exp in zip(("normed", "residual", "silu_and_mul", "q", "k"), outputs, expected):
            assert_close(got, exp, f"{name} {dtype} after replay {seed}")


def _quantized_ops(x, residual, gate_up, weight) -> list[torch.Tensor]:
    normed, summed = TRITON_OPS.add_rms_norm_quantized(x, residual, weight, EPS)
    activated = TRITON_OPS.silu_and_mul_quantized(gate_up)
    return [normed.values.view(torch.uint8), normed.scale, summed, activated.values.view(torch.uint8), activated.scale]


@needs_cuda
def test_quantized_kernels_replay_in_a_cuda_graph():
    """Captured once; each replay on new inputs gives the bytes of an eager call on them."""
    dtype, num_tokens, hidden, inter = torch.bfloat16, 64, 4096, 14336
    static = [randn(num_tokens, hidden, dtype=dtype), randn(num_tokens, hidden, dtype=dtype, seed=1),
              randn(num_tokens, 2 * inter, dtype=dtype, seed=2)]
    weight = randn(hidden, dtype=dtype, seed=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        _quantized_ops(*static, weight)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _quantized_ops(*static, weight)
    for seed in (10, 20):
        for i, buffer in enumerate(static):
            buffer.copy_(randn(*buffer.shape, dtype=dtype, seed=seed + i, scale=seed / 10))
        graph.replay()
        expected = _quantized_ops(*static, weight)
        for name, got, exp in zip(("normed", "normed scale", "residual", "silu", "silu scale"), outputs, expected):
            assert torch.equal(got, exp), f"{name} after replay {seed}"


@needs_cuda
def test_rotary_and_cache_replays_in_a_cuda_graph():
    """Captured once; each replay rotates new q/k and stores them at new slots of the same cache."""
    dtype, num_tokens, num_heads, num_kv_heads, head_dim = torch.bfloat16, 8, 32, 8, 128
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    q, k, v = (randn(num_tokens, h, head_dim, dtype=dtype, seed=s) for s, h in
               ((0, num_heads), (1, num_kv_heads), (2, num_kv_heads)))
    positions = torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE)
    slots = torch.arange(num_tokens, dtype=torch.int64, device=DEVICE)
    caches = torch.zeros(2, 16, 16, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, caches[0], caches[1], slots)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out = TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, caches[0], caches[1], slots)
    expected_caches = caches.clone()
    for seed in (10, 20):
        gen = torch.Generator().manual_seed(seed)
        for buffer, fresh in ((q, randn(*q.shape, dtype=dtype, seed=seed)),
                              (k, randn(*k.shape, dtype=dtype, seed=seed + 1)),
                              (v, randn(*v.shape, dtype=dtype, seed=seed + 2)),
                              (positions, torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)),
                              (slots, torch.randperm(256, generator=gen)[:num_tokens].to(DEVICE))):
            buffer.copy_(fresh)
        graph.replay()
        expected_q = TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, expected_caches[0],
                                                expected_caches[1], slots)
        torch.cuda.synchronize()
        assert_close(q_out, expected_q, f"q after replay {seed}")
        assert_close(caches, expected_caches, f"caches after replay {seed}")


# --- the engine -----------------------------------------------------------------------------------

PROMPTS = [[5, 17, 33, 91, 4], list(range(10, 80)), [7] * 23]
STEPS = 16


def _generate(path, dtype, enable_fused_kernels):
    from meshlm import LLM, SamplingParams
    llm = LLM(str(path), device="cuda", dtype=dtype, block_size=16, max_model_len=256, num_kv_blocks=128,
              max_batch_size=4, enable_fused_kernels=enable_fused_kernels)
    engine = llm.local_model_runner()
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    ops_name = engine.model.ops.name
    replays = engine.graph_runner.num_replays if engine.graph_runner is not None else 0
    llm.shutdown()
    return outs, ops_name, replays


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory):
    from tests.model_factory import make_random_model
    overrides = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    if request.param == "qwen3":
        overrides["head_dim"] = 64
    return make_random_model(tmp_path_factory.mktemp(request.param), request.param, weight_std=0.2, **overrides)


@needs_cuda
def test_engine_fused_and_unfused_agree(model_dir):
    plain, plain_ops, _ = _generate(model_dir, "float32", False)
    fused, fused_ops, replays = _generate(model_dir, "float32", True)
    assert (plain_ops, fused_ops) == ("torch", "triton")
    assert replays > 0, "decode steps did not replay the CUDA graphs"
    for p, f in zip(plain, fused):
        assert f.token_ids == p.token_ids
        for step_p, step_f in zip(p.logprobs, f.logprobs):
            for token in set(step_p) & set(step_f):
                assert abs(step_f[token] - step_p[token]) < 1e-3, (token, step_f[token], step_p[token])
