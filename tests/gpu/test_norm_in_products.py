"""The RMS norm between two blocks inside the one-row products around it (kernels/one_row.py's
SummedRow): the product before adds the residual and stores the sum, the sum times the norm's
weight and its tiles' sums of squares (gemv_triton.one_row_add_norm); the gated gate/up and the
QKV-rotary products after take them (gemv_triton.NormIn). Against the norm kernel's bits where the
arithmetic is the same, float64 elsewhere. Runs on a CUDA GPU, or on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_norm_in_products.py
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels.attention import RotaryEmbedding  # noqa: E402
from meshlm.kernels.fused_ops import TritonOps  # noqa: E402
from meshlm.kernels.gemv_triton import GemvTiles, NormIn, one_row_add_norm, one_row_gemm  # noqa: E402
from meshlm.kernels.kv_quant import FP8_KV_DTYPE  # noqa: E402
from meshlm.kernels.qkv_rotary_triton import qkv_rotary_cache  # noqa: E402

from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS  # noqa: E402

pytestmark = KERNEL_MARKS

EPS = 1e-5
FP8 = torch.float8_e4m3fn


def _weight(n: int, k: int, weight_dtype: torch.dtype, gen: torch.Generator):
    """(weight [n, k], its per-channel scale or None) on DEVICE."""
    w = (torch.randn(n, k, generator=gen) * (8.0 if weight_dtype == FP8 else 0.05)).to(weight_dtype)
    s = torch.rand(n, generator=gen) * 0.01 + 1e-3 if weight_dtype == FP8 else None
    return w.to(DEVICE), None if s is None else s.to(DEVICE)


def _summed_row(k: int, gen: torch.Generator):
    """(s [1, k] bf16 with an RMS far from 1, g [k] bf16, s * g rounded, float32 sums of s**2 over
    tiles of 16 channels): what one_row_add_norm hands the next product."""
    s = (torch.randn(1, k, generator=gen) * 7.0).to(torch.bfloat16)
    g = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16)
    scaled = (s.float() * g.float()).to(torch.bfloat16)
    padded = torch.nn.functional.pad(s.float()[0] ** 2, (0, -k % 16))
    sumsq = padded.view(-1, 16).sum(dim=1)
    return [t.to(DEVICE) for t in (s, g, scaled, sumsq)]


def _normed64(s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The RMS norm of ``s`` times ``g`` in float64, on the CPU."""
    s, g = s.double().cpu(), g.double().cpu()
    return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * g


ADD_CASES = [  # n, k, weight dtype, tiles
    (96, 512, FP8, GemvTiles(16, 128, 1, 4)),
    (100, 640, FP8, GemvTiles(32, 128, 1, 4, num_stages=2)),  # N past the tiles
    (80, 600, torch.bfloat16, GemvTiles(8, 256, 1, 4)),  # K not a multiple of BLOCK_K
    (72, 384, torch.bfloat16, GemvTiles(16, 64, 1, 2, num_stages=3)),
]


@pytest.mark.parametrize("n, k, weight_dtype, tiles", ADD_CASES)
def test_the_product_adds_the_residual_as_the_norm_kernel_does(n, k, weight_dtype, tiles):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16).to(DEVICE)
    w, s = _weight(n, k, weight_dtype, gen)
    residual = (torch.randn(1, n, generator=gen) * 3.0).to(torch.bfloat16).to(DEVICE)
    g = (torch.rand(n, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    row, scaled, sumsq = one_row_add_norm(x, w, s, tiles, residual, g)
    product = one_row_gemm(x, w, s, None, tiles)
    normed, summed = TritonOps().add_rms_norm(product, residual, g, EPS)
    assert torch.equal(row, summed)  # the norm kernel's sum, bitwise
    assert not torch.equal(row, product)  # the residual was added
    want_scaled = (row.float() * g.float()).to(torch.bfloat16)
    if IS_INTERPRETED:  # the interpreter rounds float32 to bf16 toward zero: one step off at most
        assert torch.allclose(scaled.float(), want_scaled.float(), rtol=2 ** -7, atol=0.0)
    else:
        assert torch.equal(scaled, want_scaled)
    num_tiles = -(-n // tiles.block_n)
    assert sumsq.shape == (num_tiles,) and sumsq.dtype == torch.float32
    squares = torch.nn.functional.pad(row.double().cpu()[0] ** 2, (0, num_tiles * tiles.block_n - n))
    want = squares.view(num_tiles, tiles.block_n).sum(dim=1)
    assert torch.allclose(sumsq.double().cpu(), want, rtol=1e-5, atol=0.0)
    # the next product's rstd from these sums is the norm kernel's: its normed row from the scaled one
    rstd = torch.rsqrt(sumsq.sum() / n + EPS)
    assert torch.allclose((scaled.float() * rstd).double().cpu(), normed.double().cpu(), rtol=2 ** -6,
                          atol=1e-3 * normed.abs().max().item())


GATED_CASES = [  # n (gate and up rows), k, weight dtype, tiles
    (96, 512, FP8, GemvTiles(16, 128, 1, 4)),
    (80, 600, torch.bfloat16, GemvTiles(4, 256, 1, 4)),
    (96, 1024, FP8, GemvTiles(16, 128, 1, 4, num_stages=3)),
]


@pytest.mark.parametrize("n, k, weight_dtype, tiles", GATED_CASES)
def test_gated_product_takes_the_norm(n, k, weight_dtype, tiles):
    gen = torch.Generator().manual_seed(7 * n + k)
    s_row, g, scaled, sumsq = _summed_row(k, gen)
    w, s = _weight(n, k, weight_dtype, gen)
    got = one_row_gemm(scaled, w, s, None, tiles, gated=True, norm_in=NormIn(sumsq, EPS))
    product = _normed64(s_row, g) @ w.double().cpu().t()
    if s is not None:
        product = product * s.double().cpu()
    gate, up = product[:, :n // 2], product[:, n // 2:]
    want = gate * torch.sigmoid(gate) * up
    # the norm's two bf16 roundings, then as the gated product's test: a few bf16 steps of each factor
    tolerance = 2.0 ** -4 * (gate * torch.sigmoid(gate)).abs() * up.abs() + want.abs().max() * 2e-3
    assert ((got.double().cpu() - want).abs() <= tolerance).all()
    unnormed = one_row_gemm(scaled, w, s, None, tiles, gated=True)  # the rstd left out: far off
    assert ((unnormed.double().cpu() - want).abs() > tolerance).any()


QKV_CASES = [  # heads, kv heads, head_dim, K, weight dtype, cache dtype, tiles
    (4, 2, 16, 256, torch.bfloat16, torch.bfloat16, GemvTiles(4, 64, 1, 4)),
    (6, 2, 12, 320, FP8, FP8_KV_DTYPE, GemvTiles(8, 64, 3, 4)),  # K split: each split scales its sums
    (4, 2, 16, 512, FP8, torch.bfloat16, GemvTiles(16, 64, 1, 4, num_stages=2)),
]


@pytest.mark.parametrize("heads, kv_heads, head_dim, k, weight_dtype, cache_dtype, tiles", QKV_CASES)
def test_qkv_rotary_product_takes_the_norm(heads, kv_heads, head_dim, k, weight_dtype, cache_dtype, tiles):
    gen = torch.Generator().manual_seed(heads * k)
    s_row, g, scaled, sumsq = _summed_row(k, gen)
    w, s = _weight((heads + 2 * kv_heads) * head_dim, k, weight_dtype, gen)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, torch.device(DEVICE))
    positions, slots = torch.tensor([21], device=DEVICE), torch.tensor([9], device=DEVICE)
    is_fp8 = cache_dtype == FP8_KV_DTYPE
    kv_scales = [torch.full((kv_heads,), 0.75, device=DEVICE) if is_fp8 else None for _ in range(2)]

    def run(x, norm_in):
        caches = [torch.zeros(4, 4, kv_heads, head_dim, device=DEVICE).to(cache_dtype) for _ in range(2)]
        q = qkv_rotary_cache(x, w, s, None, tiles, rotary.cos, rotary.sin, positions, slots, *caches, *kv_scales,
                             heads, kv_heads, head_dim, norm_in)
        return q, caches

    got_q, (k_cache, v_cache) = run(scaled, NormIn(sumsq, EPS))
    qkv = _normed64(s_row, g) @ w.double().cpu().t()
    if s is not None:
        qkv = qkv * s.double().cpu()
    q, _, v = qkv[0].split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    q = q.view(heads, head_dim)
    cos, sin = rotary.cos[21].double().cpu(), rotary.sin[21].double().cpu()
    half = head_dim // 2
    rotated = torch.cat([q[:, :half] * cos - q[:, half:] * sin, q[:, half:] * cos + q[:, :half] * sin], dim=-1)
    atol = 1e-2 * rotated.abs().max().item()
    assert torch.allclose(got_q[0].double().cpu(), rotated, rtol=2 ** -5, atol=atol)
    stored_v = v_cache[2, 1].double().cpu().flatten() * (0.75 if is_fp8 else 1.0)
    assert torch.allclose(stored_v, v, rtol=2 ** -3 if is_fp8 else 2 ** -5, atol=2e-2 * v.abs().max().item())
    unnormed_q, _ = run(scaled, None)  # the rstd left out: far off
    assert not torch.allclose(unnormed_q[0].double().cpu(), rotated, rtol=2 ** -5, atol=atol)
