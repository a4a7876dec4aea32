"""One row's QKV projection ending in rotary and the KV cache's store: for a decode step of one
token, the one-row product (kernels/gemv_triton.py) and the rotate-and-cache kernel
(kernels/rotary_triton.py) as one kernel, one launch fewer a layer.

Each program holds BLOCK_N/2 pairs of the weight's rows: channels j and j + head_dim/2 of one head
(query, key or value), the two values rotary combines. At the end (after the last split where K
is split) a pair's two float32 sums are scaled, biased and rounded to the row's dtype, as the
product's output is; query pairs are rotated into ``q_out``, key pairs rotated into the key cache
and value pairs copied into the value cache at the token's slot (a float8 cache: divided by the
head's scale and clamped to +-448), with the rotate-and-cache kernel's arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshlm.kernels.gemm_epilogue import scale_and_bias
from meshlm.kernels.gemv_triton import GemvTiles, NormIn, norm_in_args, row_launch, row_sums
from meshlm.kernels.kv_quant import FP8_KV_MAX, is_fp8_kv
from meshlm.kernels.triton_launch import weight_preload

__all__ = ["qkv_rotary_cache", "takes_cache"]

FP8_MAX = tl.constexpr(FP8_KV_MAX)


def takes_cache(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether the kernel takes these operands: a cache of x's dtype or float8, unit strides along
    the head dimension and cos/sin's columns, an even head dimension that cos and sin rotate whole."""
    same = k_cache.dtype == v_cache.dtype and k_cache.shape == v_cache.shape
    return (same and (is_fp8_kv(k_cache) or k_cache.dtype == x.dtype) and head_dim % 2 == 0
            and cos.dim() == 2 and cos.shape[1] == head_dim // 2
            and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and cos.stride(1) == 1
            and sin.stride() == cos.stride())


def qkv_rotary_cache(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                     bias: torch.Tensor | None, tiles: GemvTiles, cos: torch.Tensor, sin: torch.Tensor,
                     positions: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                     num_heads: int, num_kv_heads: int, head_dim: int, norm_in: NormIn | None = None) -> torch.Tensor:
    """``x`` [1, K] times the QKV ``weight`` [(num_heads + 2 num_kv_heads) head_dim, K] (float8 with
    ``weight_scale``, or x's dtype with None), plus ``bias``: the query heads rotated at
    ``positions[0]`` are returned [1, num_heads, head_dim]; the rotated key heads and the value
    heads go into ``k_cache`` and ``v_cache`` [blocks, block_size, num_kv_heads, head_dim] at
    ``slot_mapping[0]`` (float8: quantized by ``k_scale``, ``v_scale`` [num_kv_heads]). ``norm_in``:
    the sums are scaled by its rstd first (``x`` is ``s * g``, gemv_triton.NormIn)."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, weight.shape)
    assert n == (num_heads + 2 * num_kv_heads) * head_dim and tiles.block_n % 2 == 0, (n, tiles)
    q_out = torch.empty((1, num_heads, head_dim), dtype=x.dtype, device=x.device)
    num_tiles = triton.cdiv(n // 2, tiles.block_n // 2)
    launch = row_launch(x, weight, weight_scale, tiles, num_tiles, num_tiles * tiles.block_n)
    is_fp8 = is_fp8_kv(k_cache)
    _qkv_rotary_cache_kernel[(num_tiles, launch.split_k)](
        q_out, k_cache, v_cache, launch.partial, launch.counters, x, weight, launch.scale,
        bias if bias is not None else q_out, cos, sin, positions, slot_mapping,
        k_scale if is_fp8 else q_out, v_scale if is_fp8 else q_out,  # the scales are read for a float8 cache only
        n, k, launch.k_per_split, weight.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), num_heads, num_kv_heads,
        k_cache.shape[1], **norm_in_args(norm_in, q_out), HEAD_DIM=head_dim, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        IS_SPLIT=launch.split_k > 1, EVEN_K=k % tiles.block_k == 0, SCALE=launch.scale_kind,
        HAS_BIAS=bias is not None, IS_FP8=is_fp8, PDL=launch.pdl, PRELOAD=weight_preload(x.device),
        STAGES=tiles.num_stages, num_warps=tiles.num_warps, launch_pdl=launch.pdl)
    return q_out


@triton.jit
def _qkv_rotary_cache_kernel(q_out_ptr, k_cache_ptr, v_cache_ptr, partial_ptr, counter_ptr, x_ptr, w_ptr,
                             scale_ptr, bias_ptr, cos_ptr, sin_ptr, positions_ptr, slot_mapping_ptr,
                             k_scale_ptr, v_scale_ptr, N, K, k_per_split, stride_wn, stride_cos,
                             stride_kc_block, stride_kc_offset, stride_kc_head,
                             stride_vc_block, stride_vc_offset, stride_vc_head, num_heads, num_kv_heads, block_size,
                             sumsq_in_ptr, num_partials, eps,
                             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             IS_SPLIT: tl.constexpr, EVEN_K: tl.constexpr, SCALE: tl.constexpr,
                             HAS_BIAS: tl.constexpr, IS_FP8: tl.constexpr, PDL: tl.constexpr,
                             PRELOAD: tl.constexpr, STAGES: tl.constexpr = 1, NORM_IN: tl.constexpr = False,
                             BLOCK_P: tl.constexpr = 1):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    lanes = tl.arange(0, BLOCK_N)
    # lanes 2i and 2i+1: channels j and j + HEAD_DIM/2 of pair i's head; pairs past the last wrap
    # to valid ones (loaded, never stored)
    pair = (pid_n * (BLOCK_N // 2) + lanes // 2) % (N // 2)
    rows = (pair // (HEAD_DIM // 2)) * HEAD_DIM + pair % (HEAD_DIM // 2) + (lanes % 2) * (HEAD_DIM // 2)
    # The token's position and slot, and its cos and sin, before the product: step inputs, written
    # before the step's first kernel (no kernel launched with PDL writes them), safe to read before
    # the wait as the weights are (a batch-1
    # step 4.07 -> 4.05 ms against loading them after the product). The attention kernel after this
    # one launches as its programs exit: launched at the wait (as the products' next kernels are),
    # its programs took room on the SMs from this product's (4.08 -> 4.13 ms; the step unfused: 4.09).
    slot, cos, sin = _token_inputs(pid_n, positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, stride_cos, HEAD_DIM,
                                   BLOCK_N)
    # NORM_IN: the norm before this product, deferred to its sums (gemv_triton.NormIn)
    sums = row_sums(x_ptr, w_ptr, rows, pid_k * k_per_split, K, k_per_split, stride_wn, sumsq_in_ptr, num_partials,
                    eps, BLOCK_N, BLOCK_K, EVEN_K, PDL, PRELOAD, LAUNCH_NEXT=False, STAGES=STAGES, NORM_IN=NORM_IN,
                    BLOCK_P=BLOCK_P)
    if IS_SPLIT:  # partial [split_k, tiles * BLOCK_N]; the last split of the tile to finish ends it
        slots = pid_n * BLOCK_N + lanes
        split_stride = tl.num_programs(0) * BLOCK_N
        tl.store(partial_ptr + pid_k * split_stride + slots, sums)
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(1) - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):  # in split order, whichever ended last
                total += tl.load(partial_ptr + s * split_stride + slots, cache_modifier=".cg")
            _rotate_and_store(total, rows, pid_n, N, scale_ptr, bias_ptr, slot, cos, sin, q_out_ptr,
                              k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, stride_kc_block, stride_kc_offset,
                              stride_kc_head, stride_vc_block, stride_vc_offset, stride_vc_head, num_heads,
                              num_kv_heads, block_size, HEAD_DIM, BLOCK_N, SCALE, HAS_BIAS, IS_FP8)
            tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _rotate_and_store(sums, rows, pid_n, N, scale_ptr, bias_ptr, slot, cos, sin, q_out_ptr,
                          k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, stride_kc_block, stride_kc_offset,
                          stride_kc_head, stride_vc_block, stride_vc_offset, stride_vc_head, num_heads,
                          num_kv_heads, block_size, HEAD_DIM, BLOCK_N, SCALE, HAS_BIAS, IS_FP8)


@triton.jit
def _token_inputs(pid_n, positions_ptr, slot_mapping_ptr, cos_ptr, sin_ptr, stride_cos, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The token's slot, and cos and sin at its position of the tile's pairs' channels."""
    j = (pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)) % (HEAD_DIM // 2)
    position = tl.load(positions_ptr).to(tl.int64)
    slot = tl.load(slot_mapping_ptr).to(tl.int64)
    cos = tl.load(cos_ptr + position * stride_cos + j)
    sin = tl.load(sin_ptr + position * stride_cos + j)
    return slot, cos, sin


@triton.jit
def _rotate_and_store(sums, rows, pid_n, N, scale_ptr, bias_ptr, slot, cos, sin, q_out_ptr, k_cache_ptr,
                      v_cache_ptr, k_scale_ptr, v_scale_ptr, stride_kc_block, stride_kc_offset, stride_kc_head,
                      stride_vc_block, stride_vc_offset, stride_vc_head, num_heads, num_kv_heads, block_size,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IS_FP8: tl.constexpr):
    """The tile's float32 sums [BLOCK_N] (pairs of channels) as the product's output (scaled, biased,
    rounded to q's dtype), then rotated into q or the key cache, or copied into the value cache."""
    dtype = q_out_ptr.dtype.element_ty
    cache_dtype = k_cache_ptr.dtype.element_ty
    HALF: tl.constexpr = HEAD_DIM // 2
    y = scale_and_bias(sums[None, :], rows, N, scale_ptr, bias_ptr, SCALE, HAS_BIAS).to(dtype).to(tl.float32)
    x1, x2 = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))  # [pairs] each: channel j and j + HALF
    pair = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    is_pair = pair < N // 2
    head = pair // HALF
    j = pair % HALF
    first, second = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    is_q = is_pair & (head < num_heads)
    q_ptrs = q_out_ptr + head * HEAD_DIM + j
    tl.store(q_ptrs, first.to(dtype), mask=is_q)
    tl.store(q_ptrs + HALF, second.to(dtype), mask=is_q)
    kv_head = head - num_heads
    is_k = is_pair & (kv_head >= 0) & (kv_head < num_kv_heads)
    v_head = kv_head - num_kv_heads
    is_v = is_pair & (v_head >= 0)
    v1, v2 = x1, x2
    if IS_FP8:  # as kernels/rotary_triton.py's _to_fp8_range
        k_scale = tl.load(k_scale_ptr + kv_head, mask=is_k, other=1.0)
        first = tl.minimum(tl.maximum(first / k_scale, -FP8_MAX), FP8_MAX)
        second = tl.minimum(tl.maximum(second / k_scale, -FP8_MAX), FP8_MAX)
        v_scale = tl.load(v_scale_ptr + v_head, mask=is_v, other=1.0)
        v1 = tl.minimum(tl.maximum(v1 / v_scale, -FP8_MAX), FP8_MAX)
        v2 = tl.minimum(tl.maximum(v2 / v_scale, -FP8_MAX), FP8_MAX)
    block = slot // block_size
    offset = slot % block_size
    k_ptrs = k_cache_ptr + block * stride_kc_block + offset * stride_kc_offset + kv_head * stride_kc_head + j
    tl.store(k_ptrs, first.to(cache_dtype), mask=is_k)
    tl.store(k_ptrs + HALF, second.to(cache_dtype), mask=is_k)
    v_ptrs = v_cache_ptr + block * stride_vc_block + offset * stride_vc_offset + v_head * stride_vc_head + j
    tl.store(v_ptrs, v1.to(cache_dtype), mask=is_v)
    tl.store(v_ptrs + HALF, v2.to(cache_dtype), mask=is_v)
