"""The one-row product on the CUDA cores (kernels/gemv_triton.py) against float64 arithmetic, and
where fp8_weight_gemm hands it a row. Runs on a CUDA GPU, or on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_gemv_kernel.py
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels import fp8_gemm_triton, gemv_triton  # noqa: E402
from meshlm.kernels.gemv_triton import GemvTiles, gemv_config, one_row_gemm  # noqa: E402
from meshlm.kernels.triton_launch import set_weight_preload  # noqa: E402
from meshlm.kernels.tuned_configs import tuned_entry  # noqa: E402

from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS


def _operands(n: int, k: int, weight_dtype: torch.dtype, scale: str, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * (8.0 if weight_dtype == torch.float8_e4m3fn else 0.05)).to(weight_dtype)
    s = {"none": None, "channel": torch.rand(n, generator=gen) * 0.01 + 1e-3,
         "tensor": torch.tensor([0.0123])}[scale]
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    on = [t if t is None else t.to(DEVICE) for t in (x, w, s, b)]
    return on


def _reference(x, w, s, b) -> torch.Tensor:
    y = x.double().cpu() @ w.double().cpu().t()
    if s is not None:
        y = y * s.double().cpu()
    if b is not None:
        y = y + b.double().cpu()
    return y


CASES = [  # n, k, weight dtype, scale, bias, tiles
    (96, 512, torch.float8_e4m3fn, "channel", False, GemvTiles(16, 128, 1, 4)),
    (100, 640, torch.float8_e4m3fn, "channel", True, GemvTiles(32, 128, 3, 4)),  # N past the tiles, uneven splits
    (64, 600, torch.float8_e4m3fn, "tensor", False, GemvTiles(16, 256, 2, 4)),  # K not a multiple of BLOCK_K
    (80, 512, torch.bfloat16, "none", False, GemvTiles(8, 128, 4, 4)),
    (72, 384, torch.bfloat16, "none", True, GemvTiles(16, 64, 1, 2)),
    # weight tiles copied ahead (num_stages)
    (96, 1024, torch.float8_e4m3fn, "channel", False, GemvTiles(16, 128, 1, 4, num_stages=3)),
    (100, 1280, torch.float8_e4m3fn, "channel", True, GemvTiles(32, 128, 2, 4, num_stages=2)),
    (64, 600, torch.float8_e4m3fn, "tensor", False, GemvTiles(16, 128, 1, 4, num_stages=2)),
    (80, 1024, torch.bfloat16, "none", False, GemvTiles(8, 128, 2, 4, num_stages=3)),
    (64, 512, torch.float8_e4m3fn, "channel", False, GemvTiles(16, 128, 8, 4, num_stages=3)),  # splits of 0-1 tiles
]


@pytest.mark.parametrize("n, k, weight_dtype, scale, bias, tiles", CASES)
def test_one_row_against_float64(n, k, weight_dtype, scale, bias, tiles):
    x, w, s, b = _operands(n, k, weight_dtype, scale, bias)
    out = one_row_gemm(x, w, s, b, tiles)
    assert out.shape == (1, n) and out.dtype == torch.bfloat16
    want = _reference(x, w, s, b)
    # float32 sums of exact products, rounded once to bf16: within half a bf16 step of the value
    # (plus float32's sum error, far smaller); the interpreter truncates to bf16: a whole step
    tolerance = want.abs() * 2.0 ** (-7 if IS_INTERPRETED else -8) + want.abs().max() * 1e-6
    assert ((out.double().cpu() - want).abs() <= tolerance).all()
    again = one_row_gemm(x, w, s, b, tiles)
    assert torch.equal(out, again)  # the splits are added in one order, whichever ends last


@pytest.mark.parametrize("n, k, weight_dtype, scale, bias, tiles", [case for case in CASES if case[-1].num_stages > 1])
def test_weight_tiles_copied_ahead_give_the_same_bits(n, k, weight_dtype, scale, bias, tiles):
    """num_stages only moves the weight's loads earlier: the same sums in the same order."""
    x, w, s, b = _operands(n, k, weight_dtype, scale, bias)
    one_stage = dataclasses.replace(tiles, num_stages=1)
    assert torch.equal(one_row_gemm(x, w, s, b, tiles), one_row_gemm(x, w, s, b, one_stage))


def test_fp8_weight_gemm_hands_one_row_to_it_where_a_shape_is_recorded(monkeypatch):
    x, w, s, _ = _operands(96, 512, torch.float8_e4m3fn, "channel", False)
    calls = []
    real = gemv_triton.one_row_gemm
    monkeypatch.setattr(gemv_triton, "gemv_tiles", lambda x, w: GemvTiles(16, 128, 2, 4) if x.shape[0] == 1 else None)
    monkeypatch.setattr(gemv_triton, "one_row_gemm", lambda *a: calls.append(a[-1]) or real(*a))
    out = fp8_gemm_triton.fp8_weight_gemm(x, w, s)
    assert calls == [GemvTiles(16, 128, 2, 4)]
    assert torch.equal(out, real(x, w, s, None, GemvTiles(16, 128, 2, 4)))
    fp8_gemm_triton.fp8_weight_gemm(torch.cat([x, x]), w, s)  # two rows: the small-batch product
    fp8_gemm_triton.fp8_weight_gemm(x, w, s, tiles=fp8_gemm_triton.FP8GemmTiles(16, 128, 1))  # tiles named
    assert len(calls) == 1


def test_the_h200_records_every_llama_3_8b_product_for_one_row():
    """float8 and bf16 weights alike: each of the 8B's four products measured faster one-row."""
    for dtype in (torch.float8_e4m3fn, torch.bfloat16):
        for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
            tiles = GemvTiles(**tuned_entry(gemv_config(dtype), "NVIDIA H200", n, k, 1))
            assert k % tiles.split_k == 0 and (k // tiles.split_k) % tiles.block_k == 0, (dtype, n, k, tiles)
        assert tuned_entry(gemv_config(dtype), "NVIDIA H200", 4096, 4096, 2) is None  # one row only


def test_without_split_counters_one_program_walks_all_of_k(monkeypatch):
    """As in a CUDA graph captured before any eager call: the counts cannot be made."""
    x, w, s, b = _operands(100, 640, torch.float8_e4m3fn, "channel", True)
    split = one_row_gemm(x, w, s, b, GemvTiles(32, 128, 3, 4))
    monkeypatch.setattr(gemv_triton, "launch_counters", lambda *args: None)
    whole = one_row_gemm(x, w, s, b, GemvTiles(32, 128, 3, 4))
    assert torch.equal(whole, one_row_gemm(x, w, s, b, GemvTiles(32, 128, 1, 4)))
    want = _reference(x, w, s, b)
    tolerance = want.abs() * 2.0 ** (-7 if IS_INTERPRETED else -8) + want.abs().max() * 1e-6
    assert ((whole.double().cpu() - want).abs() <= tolerance).all()
    assert ((split.double().cpu() - want).abs() <= tolerance).all()


@pytest.mark.parametrize("n, k, weight_dtype, scale, bias, tiles", CASES + [
    (64, 512, torch.float8_e4m3fn, "channel", False, GemvTiles(16, 128, 8, 4))])  # splits past K's columns
def test_the_first_tile_loaded_before_the_wait_gives_the_same_bits(n, k, weight_dtype, scale, bias, tiles):
    x, w, s, b = _operands(n, k, weight_dtype, scale, bias)
    preloaded = one_row_gemm(x, w, s, b, tiles)  # the default
    set_weight_preload(False)
    try:
        plain = one_row_gemm(x, w, s, b, tiles)
    finally:
        set_weight_preload(True)
    assert torch.equal(plain, preloaded)
    want = _reference(x, w, s, b)
    tolerance = want.abs() * 2.0 ** (-7 if IS_INTERPRETED else -8) + want.abs().max() * 1e-6
    assert ((preloaded.double().cpu() - want).abs() <= tolerance).all()


def _silu_and_mul_kernel(gate_up: torch.Tensor) -> torch.Tensor:
    """The SiLU-and-mul kernel of TritonOps (kernels/fused_ops.py) on [1, 2I] rows: [1, I]."""
    from meshlm.kernels.fused_ops import _silu_and_mul_kernel
    width = gate_up.shape[1] // 2
    out = torch.empty((1, width), dtype=gate_up.dtype, device=gate_up.device)
    _silu_and_mul_kernel[(1, -(-width // 64))](out, gate_up, out.stride(0), gate_up.stride(0), width, BLOCK=64,
                                               PDL=False)
    return out


GATED_CASES = [  # n (gate and up rows), k, weight dtype, scale, bias, tiles
    (96, 512, torch.float8_e4m3fn, "channel", False, GemvTiles(16, 128, 1, 4)),
    (100, 640, torch.float8_e4m3fn, "tensor", False, GemvTiles(8, 128, 1, 4)),  # 50 channels: past the tiles
    (80, 600, torch.bfloat16, "none", False, GemvTiles(4, 256, 1, 4)),  # K not a multiple of BLOCK_K
    (72, 384, torch.bfloat16, "none", True, GemvTiles(16, 64, 1, 2)),
    (96, 1024, torch.float8_e4m3fn, "channel", False, GemvTiles(16, 128, 1, 4, num_stages=2)),
]


@pytest.mark.parametrize("n, k, weight_dtype, scale, bias, tiles", GATED_CASES)
def test_gated_one_row_is_the_product_then_silu_and_mul_bitwise(n, k, weight_dtype, scale, bias, tiles):
    x, w, s, b = _operands(n, k, weight_dtype, scale, bias, seed=3)
    gated = one_row_gemm(x, w, s, b, tiles, gated=True)
    assert gated.shape == (1, n // 2) and gated.dtype == torch.bfloat16
    assert torch.equal(gated, _silu_and_mul_kernel(one_row_gemm(x, w, s, b, tiles)))
    product = _reference(x, w, s, b)  # float64 [1, n]
    gate, up = product[:, :n // 2], product[:, n // 2:]
    want = gate * torch.sigmoid(gate) * up
    # three bf16 roundings (gate, up, silu) and the product's: a few bf16 steps of each factor
    tolerance = 2.0 ** -5 * (gate * torch.sigmoid(gate)).abs() * up.abs() + want.abs().max() * 1e-3
    assert ((gated.double().cpu() - want).abs() <= tolerance).all()


@needs_cuda
def test_one_row_silu_and_mul_takes_a_row_where_the_one_row_product_runs(monkeypatch):
    from meshlm.kernels import one_row
    x, w, s, _ = _operands(96, 512, torch.float8_e4m3fn, "channel", False)
    tiles = {"tiles": GemvTiles(16, 128, 1, 4)}
    monkeypatch.setattr(gemv_triton, "gemv_tiles", lambda x, w: tiles["tiles"] if x.shape[0] == 1 else None)
    out = one_row.one_row_silu_and_mul(x, w, s)
    assert torch.equal(out, _silu_and_mul_kernel(one_row_gemm(x, w, s, None, tiles["tiles"])))
    assert one_row.one_row_silu_and_mul(torch.cat([x, x]), w, s) is None  # two rows
    one_row.set_gated_one_row(False)
    try:
        assert one_row.one_row_silu_and_mul(x, w, s) is None
    finally:
        one_row.set_gated_one_row(True)
    tiles["tiles"] = GemvTiles(16, 128, 2, 4)  # K split: the splits' sums meet in another kernel's end
    assert one_row.one_row_silu_and_mul(x, w, s) is None


@needs_cuda
@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.bfloat16])
def test_llama_3_8b_gate_up_row_from_one_kernel_equals_the_two(weight_dtype):
    """The recorded shape of the 8B's gate/up projection (28672 x 4096) through the dispatch the
    model takes, against linear then TritonOps' SiLU-and-mul, which a decode step ran before."""
    from meshlm.kernels import fp8, one_row
    from meshlm.kernels.fused_ops import TritonOps
    x, w, s, _ = _operands(28672, 4096, weight_dtype, "channel" if weight_dtype.itemsize == 1 else "none", False)
    if gemv_triton.gemv_tiles(x, w) is None:
        pytest.skip(f"no one-row shape recorded for {torch.cuda.get_device_name()}")
    fused = one_row.one_row_silu_and_mul(x, w, s)
    assert fused is not None and fused.shape == (1, 14336)
    assert torch.equal(fused, TritonOps().silu_and_mul(fp8.linear(x, w, s)))
