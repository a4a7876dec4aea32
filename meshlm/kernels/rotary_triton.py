"""The rotary-embedding kernels of TritonOps (kernels/fused_ops.py): rotary on q and k, and rotary
with the store of k and v into the paged KV cache (quantized into an fp8 cache), one program per token."""
from __future__ import annotations

import triton
import triton.language as tl

from meshlm.kernels.kv_quant import FP8_KV_MAX
from meshlm.kernels.triton_pdl import wait_for_previous_kernel

FP8_MAX = tl.constexpr(FP8_KV_MAX)


@triton.jit
def _to_fp8_range(x, scale_ptr, heads, num_heads):
    """``x`` [HEADS_BLOCK, cols] fp32 divided by its head's scale, clamped to e4m3's +-448."""
    scale = tl.load(scale_ptr + heads, mask=heads < num_heads, other=1.0)  # [HEADS_BLOCK, 1]
    return tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)


@triton.jit
def _rotate_heads(out_ptr, x_ptr, stride_x_head, stride_out_head, num_heads, cos, sin, scale_ptr,
                  HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr,
                  IS_FP8: tl.constexpr):
    """Rotate every head of one token: ``out = (x1 cos - x2 sin, x2 cos + x1 sin)`` in fp32;
    ``IS_FP8``: into an fp8 cache, scaled by ``scale_ptr`` [num_heads]."""
    heads = tl.arange(0, HEADS_BLOCK)[:, None]  # [HEADS_BLOCK, 1]
    cols = tl.arange(0, HALF_BLOCK)[None, :]  # [1, HALF_BLOCK]
    mask = (heads < num_heads) & (cols < HALF)
    first = x_ptr + heads * stride_x_head + cols
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    out = out_ptr + heads * stride_out_head + cols
    first_half, second_half = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if IS_FP8:
        first_half = _to_fp8_range(first_half, scale_ptr, heads, num_heads)
        second_half = _to_fp8_range(second_half, scale_ptr, heads, num_heads)
    tl.store(out, first_half.to(dtype), mask=mask)
    tl.store(out + HALF, second_half.to(dtype), mask=mask)


@triton.jit
def rotary_kernel(q_out_ptr, k_out_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr,
                   stride_q_token, stride_q_head, stride_k_token, stride_k_head,
                   stride_q_out_token, stride_q_out_head, stride_k_out_token, stride_k_out_head,
                   stride_cos, num_heads, num_kv_heads,
                   HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                   HEADS_BLOCK: tl.constexpr, KV_HEADS_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One token: look up cos/sin at its position, rotate its query heads and its key heads."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_BLOCK)
    cos = tl.load(cos_ptr + position * stride_cos + cols, mask=cols < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * stride_cos + cols, mask=cols < HALF, other=0.0)[None, :]
    _rotate_heads(q_out_ptr + token * stride_q_out_token, q_ptr + token * stride_q_token,
                  stride_q_head, stride_q_out_head, num_heads, cos, sin, q_ptr, HALF, HALF_BLOCK, HEADS_BLOCK,
                  False)
    _rotate_heads(k_out_ptr + token * stride_k_out_token, k_ptr + token * stride_k_token,
                  stride_k_head, stride_k_out_head, num_kv_heads, cos, sin, k_ptr, HALF, HALF_BLOCK,
                  KV_HEADS_BLOCK, False)


@triton.jit
def _copy_heads(out_ptr, x_ptr, stride_x_head, stride_out_head, num_heads, scale_ptr,
                HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr,
                IS_FP8: tl.constexpr):
    """Copy every head of one token, as two halves (the layout ``_rotate_heads`` reads);
    ``IS_FP8``: into an fp8 cache, scaled by ``scale_ptr`` [num_heads]."""
    heads = tl.arange(0, HEADS_BLOCK)[:, None]  # [HEADS_BLOCK, 1]
    cols = tl.arange(0, HALF_BLOCK)[None, :]  # [1, HALF_BLOCK]
    mask = (heads < num_heads) & (cols < HALF)
    first = x_ptr + heads * stride_x_head + cols
    out = out_ptr + heads * stride_out_head + cols
    dtype = out_ptr.dtype.element_ty
    first_half = tl.load(first, mask=mask, other=0.0)
    second_half = tl.load(first + HALF, mask=mask, other=0.0)
    if IS_FP8:
        first_half = _to_fp8_range(first_half.to(tl.float32), scale_ptr, heads, num_heads)
        second_half = _to_fp8_range(second_half.to(tl.float32), scale_ptr, heads, num_heads)
    tl.store(out, first_half.to(dtype), mask=mask)
    tl.store(out + HALF, second_half.to(dtype), mask=mask)


@triton.jit
def rotary_cache_kernel(q_out_ptr, k_cache_ptr, v_cache_ptr, k_out_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
                        positions_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                        stride_q_token, stride_q_head, stride_k_token, stride_k_head,
                        stride_v_token, stride_v_head, stride_q_out_token, stride_q_out_head,
                        stride_kc_block, stride_kc_offset, stride_kc_head,
                        stride_vc_block, stride_vc_offset, stride_vc_head, stride_k_out_token,
                        stride_k_out_head, stride_cos, num_heads, num_kv_heads, block_size,
                        HALF: tl.constexpr, HALF_BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr,
                        KV_HEADS_BLOCK: tl.constexpr, IS_FP8: tl.constexpr, STORE_K: tl.constexpr,
                        PDL: tl.constexpr):
    """One token: rotate its query heads into ``q_out``; rotate its key heads into the key cache
    and copy its value heads into the value cache, both at the token's slot (``IS_FP8``:
    quantized by ``k_scale_ptr``, ``v_scale_ptr`` [num_kv_heads]); ``STORE_K``: its rotated key
    heads into ``k_out`` too, in k's dtype."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    cols = tl.arange(0, HALF_BLOCK)
    cos = tl.load(cos_ptr + position * stride_cos + cols, mask=cols < HALF, other=0.0)[None, :]
    sin = tl.load(sin_ptr + position * stride_cos + cols, mask=cols < HALF, other=0.0)[None, :]
    _rotate_heads(q_out_ptr + token * stride_q_out_token, q_ptr + token * stride_q_token,
                  stride_q_head, stride_q_out_head, num_heads, cos, sin, q_ptr, HALF, HALF_BLOCK, HEADS_BLOCK,
                  False)
    _rotate_heads(k_cache_ptr + block * stride_kc_block + offset * stride_kc_offset,
                  k_ptr + token * stride_k_token, stride_k_head, stride_kc_head, num_kv_heads, cos, sin,
                  k_scale_ptr, HALF, HALF_BLOCK, KV_HEADS_BLOCK, IS_FP8)
    if STORE_K:
        _rotate_heads(k_out_ptr + token * stride_k_out_token, k_ptr + token * stride_k_token, stride_k_head,
                      stride_k_out_head, num_kv_heads, cos, sin, k_ptr, HALF, HALF_BLOCK, KV_HEADS_BLOCK, False)
    _copy_heads(v_cache_ptr + block * stride_vc_block + offset * stride_vc_offset,
                v_ptr + token * stride_v_token, stride_v_head, stride_vc_head, num_kv_heads, v_scale_ptr,
                HALF, HALF_BLOCK, KV_HEADS_BLOCK, IS_FP8)
