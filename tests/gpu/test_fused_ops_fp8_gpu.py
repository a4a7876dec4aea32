"""The fused kernels that write float8 rows for an FP8 product (the norm and SiLU-and-mul with the
per-row quantization inside) against the kernels then the quantization, and against torch; also
inside a CUDA graph. Runs on a CUDA GPU, or on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fused_ops_fp8_gpu.py

The interpreter's conversion to float8 differs from the GPU's (ties away from zero, subnormals
flushed, the exponent's carry dropped: tests/gpu/test_fp8_kv_kernels.py), so the float8 references
convert their fp32 values as the kernel's device does (``to_float8``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from meshlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE  # noqa: E402
from meshlm.kernels.fused_ops import TORCH_OPS  # noqa: E402

from tests.gpu.fused_ops_cases import DTYPES, EPS, TOLERANCES, TRITON_OPS, randn  # noqa: E402
from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS

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
