"""One row's QKV product ending in rotary and the cache's store (kernels/qkv_rotary_triton.py)
against the two kernels it replaces: the one-row product, then TritonOps' rotate-and-cache. Runs on
a CUDA GPU, or on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_qkv_rotary_kernel.py
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels import gemv_triton, one_row  # noqa: E402
from meshlm.kernels.attention import RotaryEmbedding  # noqa: E402
from meshlm.kernels.fused_ops import TritonOps  # noqa: E402
from meshlm.kernels.gemv_triton import GemvTiles, one_row_gemm  # noqa: E402
from meshlm.kernels.kv_quant import FP8_KV_DTYPE  # noqa: E402
from meshlm.kernels.qkv_rotary_triton import qkv_rotary_cache  # noqa: E402

from tests.gpu.kernel_device import DEVICE, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS

BLOCK_SIZE, NUM_BLOCKS = 4, 6


def _operands(heads, kv_heads, head_dim, k, weight_dtype, scale, bias, cache_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = (heads + 2 * kv_heads) * head_dim
    x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * (8.0 if weight_dtype == torch.float8_e4m3fn else 0.05)).to(weight_dtype)
    s = {"none": None, "channel": torch.rand(n, generator=gen) * 0.01 + 1e-3, "tensor": torch.tensor([0.0123])}[scale]
    b = torch.randn(n, generator=gen).to(torch.bfloat16) if bias else None
    shape = (NUM_BLOCKS, BLOCK_SIZE, kv_heads, head_dim)
    caches = [torch.randn(shape, generator=gen).to(cache_dtype) for _ in range(2)]  # other slots must stay
    # the value cache a view with other strides than the key cache's (a head's room left over)
    wider = torch.randn(NUM_BLOCKS, BLOCK_SIZE, kv_heads + 1, head_dim, generator=gen).to(cache_dtype)
    caches[1] = wider[:, :, 1:]
    kv_scales = [torch.rand(kv_heads, generator=gen) + 0.5 for _ in range(2)] if cache_dtype == FP8_KV_DTYPE \
        else [None, None]
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [to(t) for t in (x, w, s, b)], [_copy(c, DEVICE) for c in caches], [to(t) for t in kv_scales]


def _copy(cache: torch.Tensor, device=None) -> torch.Tensor:
    """A copy of ``cache`` with its strides (clone makes a view with gaps contiguous)."""
    out = torch.empty_strided(cache.shape, cache.stride(), dtype=cache.dtype, device=device or cache.device)
    return out.copy_(cache)


def _two_kernels(x, w, s, b, tiles, rotary, positions, slots, caches, kv_scales, heads, kv_heads, head_dim):
    """The one-row product, then TritonOps' rotate-and-cache: (q [1, heads, head_dim], caches)."""
    qkv = one_row_gemm(x, w, s, b, tiles)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    caches = [_copy(c) for c in caches]
    q = TritonOps().rotary_and_cache(positions, q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim),
                                     v.view(1, kv_heads, head_dim), rotary.cos, rotary.sin, caches[0], caches[1],
                                     slots, *kv_scales)
    return q, caches


CASES = [  # heads, kv heads, head_dim, K, weight dtype, scale, bias, cache dtype, tiles
    (4, 2, 16, 256, torch.bfloat16, "none", False, torch.bfloat16, GemvTiles(4, 64, 1, 4)),
    (4, 2, 16, 256, torch.float8_e4m3fn, "channel", False, torch.bfloat16, GemvTiles(16, 64, 2, 4)),
    (6, 2, 12, 320, torch.float8_e4m3fn, "tensor", True, FP8_KV_DTYPE, GemvTiles(8, 64, 3, 4)),  # tiles across heads
    (3, 1, 20, 200, torch.bfloat16, "none", True, FP8_KV_DTYPE, GemvTiles(16, 64, 1, 2)),  # pairs past the tiles
    (4, 2, 16, 512, torch.float8_e4m3fn, "channel", False, torch.bfloat16,
     GemvTiles(16, 64, 2, 4, num_stages=2)),  # weight tiles copied ahead
]


@pytest.mark.parametrize("heads, kv_heads, head_dim, k, weight_dtype, scale, bias, cache_dtype, tiles", CASES)
def test_one_kernel_gives_the_bits_of_the_product_then_rotate_and_cache(heads, kv_heads, head_dim, k, weight_dtype,
                                                                        scale, bias, cache_dtype, tiles):
    (x, w, s, b), caches, kv_scales = _operands(heads, kv_heads, head_dim, k, weight_dtype, scale, bias, cache_dtype)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, torch.device(DEVICE))
    positions = torch.tensor([37], device=DEVICE)
    slots = torch.tensor([BLOCK_SIZE * 3 + 2], device=DEVICE)
    want_q, want_caches = _two_kernels(x, w, s, b, tiles, rotary, positions, slots, caches, kv_scales, heads,
                                       kv_heads, head_dim)
    got_caches = [_copy(c) for c in caches]
    got_q = qkv_rotary_cache(x, w, s, b, tiles, rotary.cos, rotary.sin, positions, slots, *got_caches, *kv_scales,
                             heads, kv_heads, head_dim)
    assert got_q.shape == (1, heads, head_dim)
    assert torch.equal(got_q, want_q)
    for got, want, before in zip(got_caches, want_caches, caches):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert not torch.equal(got[3, 2].view(torch.uint8), before[3, 2].view(torch.uint8))  # the slot was written
    # and the rotated query against float64 arithmetic of the rounded product
    qkv = one_row_gemm(x, w, s, b, tiles).double().cpu()
    q = qkv[0, :heads * head_dim].view(heads, head_dim)
    cos, sin = rotary.cos[37].double().cpu(), rotary.sin[37].double().cpu()
    half = head_dim // 2
    rotated = torch.cat([q[:, :half] * cos - q[:, half:] * sin, q[:, half:] * cos + q[:, :half] * sin], dim=-1)
    assert torch.allclose(got_q[0].double().cpu(), rotated, rtol=2 ** -7, atol=1e-3 * rotated.abs().max().item())


def test_without_split_counters_one_program_walks_all_of_k(monkeypatch):
    """As in a CUDA graph captured before any eager call: the counts cannot be made."""
    heads, kv_heads, head_dim = 6, 2, 12
    (x, w, s, b), caches, kv_scales = _operands(heads, kv_heads, head_dim, 320, torch.float8_e4m3fn, "channel", True,
                                                FP8_KV_DTYPE, seed=5)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, torch.device(DEVICE))
    positions, slots = torch.tensor([11], device=DEVICE), torch.tensor([6], device=DEVICE)
    monkeypatch.setattr(gemv_triton, "split_counters", lambda *args: None)
    got_caches = [_copy(c) for c in caches]
    got_q = qkv_rotary_cache(x, w, s, b, GemvTiles(8, 64, 3, 4), rotary.cos, rotary.sin, positions, slots,
                             *got_caches, *kv_scales, heads, kv_heads, head_dim)
    want_q, want_caches = _two_kernels(x, w, s, b, GemvTiles(8, 64, 1, 4), rotary, positions, slots, caches,
                                       kv_scales, heads, kv_heads, head_dim)
    assert torch.equal(got_q, want_q)
    assert all(torch.equal(g.view(torch.uint8), e.view(torch.uint8)) for g, e in zip(got_caches, want_caches))


@needs_cuda
def test_dispatch_takes_one_row_where_the_one_row_product_runs(monkeypatch):
    heads, kv_heads, head_dim = 4, 2, 16
    (x, w, s, _), caches, kv_scales = _operands(heads, kv_heads, head_dim, 256, torch.float8_e4m3fn, "channel", False,
                                                torch.bfloat16)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, torch.device(DEVICE))
    positions, slots = torch.tensor([5], device=DEVICE), torch.tensor([9], device=DEVICE)
    tiles = GemvTiles(16, 64, 2, 4)
    monkeypatch.setattr(gemv_triton, "gemv_tiles", lambda x, w: tiles if x.shape[0] == 1 else None)
    want_q, want_caches = _two_kernels(x, w, s, None, tiles, rotary, positions, slots, caches, kv_scales, heads,
                                       kv_heads, head_dim)

    def fused(rows, caches):
        return one_row.one_row_qkv_rotary_cache(rows, w, s, None, heads, kv_heads, head_dim, rotary.cos, rotary.sin,
                                                positions, slots, caches, *kv_scales)
    got_caches = [_copy(c) for c in caches]
    assert torch.equal(fused(x, got_caches), want_q)
    assert all(torch.equal(g, e) for g, e in zip(got_caches, want_caches))
    assert fused(torch.cat([x, x]), caches) is None  # two rows
    assert fused(x, [c.float() for c in caches]) is None  # a cache in neither x's dtype nor float8
    one_row.set_qkv_rotary_one_row(False)
    try:
        assert fused(x, caches) is None
    finally:
        one_row.set_qkv_rotary_one_row(True)


@needs_cuda
@pytest.mark.parametrize("weight_dtype", [torch.float8_e4m3fn, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8_KV_DTYPE])
def test_llama_3_8b_qkv_row_from_one_kernel_equals_the_two(weight_dtype, cache_dtype):
    """The recorded shape of the 8B's QKV projection (6144 x 4096: 32 query heads, 8 KV heads of
    128) through the dispatch the model takes."""
    from meshlm.kernels import fp8
    heads, kv_heads, head_dim = 32, 8, 128
    (x, w, s, _), caches, kv_scales = _operands(heads, kv_heads, head_dim, 4096, weight_dtype,
                                                "channel" if weight_dtype.itemsize == 1 else "none", False, cache_dtype)
    tiles = one_row.one_row_tiles(x, w, s)
    if tiles is None:
        pytest.skip(f"no one-row shape recorded for {torch.cuda.get_device_name()}")
    rotary = RotaryEmbedding(head_dim, 8192, 500000.0, None, torch.device(DEVICE))
    positions, slots = torch.tensor([4000], device=DEVICE), torch.tensor([17], device=DEVICE)
    got_caches = [_copy(c) for c in caches]
    got_q = one_row.one_row_qkv_rotary_cache(x, w, s, None, heads, kv_heads, head_dim, rotary.cos, rotary.sin,
                                             positions, slots, got_caches, *kv_scales)
    qkv = fp8.linear(x, w, s)  # what the model's unfused path runs
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    want_caches = [_copy(c) for c in caches]
    want_q = TritonOps().rotary_and_cache(positions, q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim),
                                          v.view(1, kv_heads, head_dim), rotary.cos, rotary.sin, *want_caches, slots,
                                          *kv_scales)
    assert torch.equal(got_q, want_q)
    assert all(torch.equal(g.view(torch.uint8), e.view(torch.uint8)) for g, e in zip(got_caches, want_caches))
