"""The end of the weight products' kernels (kernels/fp8_gemm_triton.py, kernels/gemv_triton.py):
splits of K added up by the last to finish, and the float32 sums scaled and biased before the one
rounding to the output dtype."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["add_splits_if_last", "scale_and_bias"]


@triton.jit
def scale_and_bias(acc, cols, N, scale_ptr, bias_ptr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """float32 sums [rows, cols] times the weight's scale (SCALE: 2 one per channel, 1 one for all,
    0 none), plus the bias, in float32."""
    if SCALE == 2:
        acc = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    elif SCALE == 1:
        acc = acc * tl.load(scale_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def add_splits_if_last(out_ptrs, partial_ptr, offsets, split_stride, is_out, counter_ptr, tile, cols, N, scale_ptr,
                       bias_ptr, SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                       COLS: tl.constexpr):
    """Called by each split of K (grid axis 1) of output ``tile`` after storing its float32 sums at
    ``partial_ptr + split * split_stride + offsets``: the last split to finish adds them up in split
    order (the same sum whichever ends last), scales, biases, stores the [ROWS, COLS] result and
    zeroes the tile's counter for the next launch. The barrier orders every thread's stores before
    the release of the count; the acquire orders the loads after the other splits' stores."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(1) - 1:
        total = tl.zeros([ROWS, COLS], dtype=tl.float32)
        for s in range(0, tl.num_programs(1)):
            total += tl.load(partial_ptr + s * split_stride + offsets, mask=is_out, other=0.0, cache_modifier=".cg")
        y = scale_and_bias(total, cols, N, scale_ptr, bias_ptr, SCALE, HAS_BIAS)
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=is_out)
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")
