"""Per-row float8 quantization of activations in one Triton kernel: each program finds its row's
largest magnitude, writes the row's scale and the quantized row. The same arithmetic as
:func:`meshlm.kernels.fp8.quantize_per_row` (which runs it as several torch operations: on a GPU
step, one kernel instead of six before every FP8 linear layer). ``store_quantized_row`` is that
arithmetic for kernels that produce the rows (kernels/fused_ops.py's RMSNorm and SiLU-and-mul). A row
is multiplied by the reciprocal of its scale, rounded once, as vLLM's FP8 quantization kernels do."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshlm.kernels.triton_launch import programmatic_launch
from meshlm.kernels.triton_pdl import wait_for_previous_kernel

__all__ = ["quantize_rows_triton", "quantizer_warps", "row_warps", "store_quantized_row"]

_BLOCK = 1024
# Rows up to this wide are quantized in one pass, each program holding its whole row in registers
# (one load of the row, all of it in flight at once); wider rows in two passes over 1024-wide pieces.
MAX_WHOLE_ROW = 16384


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, num_cols, stride_x, stride_q,
                          FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * stride_q
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < num_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    inverse = reciprocal_rn(scale)
    for start in range(0, num_cols, BLOCK):
        is_col = start + cols < num_cols
        x = tl.load(x_row + start + cols, mask=is_col, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inverse, -FP8_MAX), FP8_MAX)
        tl.store(q_row + start + cols, q.to(q_ptr.dtype.element_ty), mask=is_col)


@triton.jit
def _quantize_whole_rows_kernel(x_ptr, q_ptr, scale_ptr, num_cols, stride_x, stride_q,
                                FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                                PDL: tl.constexpr):
    """One row of at most ``BLOCK`` columns, read once: the arithmetic of ``_quantize_rows_kernel``."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    store_quantized_row(x, q_ptr + row * stride_q, cols, mask, scale_ptr + row, FP8_MAX, MIN_SCALE)


def quantize_rows_triton(x: torch.Tensor, fp8_dtype: torch.dtype, fp8_max: float, min_scale: float,
                         num_warps: int | None = None, in_pieces: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] (last dimension contiguous) -> (``fp8_dtype`` [M, K], float32 scales [M, 1]).
    ``num_warps`` (whole rows; None: :func:`quantizer_warps`) and ``in_pieces`` (the two passes of wider
    rows at any width) are for benchmarks/row_kernels_bench.py."""
    assert x.dim() == 2 and x.stride(1) == 1, (x.shape, x.stride())
    num_rows, num_cols = x.shape
    q = torch.empty((num_rows, num_cols), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    pdl = programmatic_launch(x.device)
    if num_rows and num_cols <= MAX_WHOLE_ROW and not in_pieces:
        block = triton.next_power_of_2(num_cols)
        _quantize_whole_rows_kernel[(num_rows,)](x, q, scale, num_cols, x.stride(0), q.stride(0),
                                                 FP8_MAX=fp8_max, MIN_SCALE=min_scale, BLOCK=block,
                                                 num_warps=num_warps or quantizer_warps(block), PDL=pdl,
                                                 launch_pdl=pdl)
    elif num_rows:
        _quantize_rows_kernel[(num_rows,)](x, q, scale, num_cols, x.stride(0), q.stride(0),
                                           FP8_MAX=fp8_max, MIN_SCALE=min_scale, BLOCK=_BLOCK, num_warps=4,
                                           PDL=pdl, launch_pdl=pdl)
    return q, scale


def row_warps(block: int) -> int:
    """Warps for a program that holds a row of ``block`` values: about 8 a thread, 1 to 16 warps."""
    return max(1, min(16, block // 256))


def quantizer_warps(block: int) -> int:
    """Warps for the whole-row quantizer: about 32 values a thread, 1 to 16 warps. Its fixed cost a
    thread (the row's maximum, the scale's reciprocal) spreads over more values than at
    :func:`row_warps`: 4096-wide rows on an H200 in 4 warps 4.2 us for 1712 rows, 24.8 us for 8100,
    against 6.1 and 31.0 us in 16 (benchmarks/row_kernels_bench.py)."""
    return max(1, min(16, block // 1024))


@triton.jit
def store_quantized_row(values, q_row_ptr, cols, mask, scale_ptr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One whole row ``values`` (fp32, zeros past its end) quantized as ``_quantize_rows_kernel``
    quantizes a row, for kernels that compute the row and quantize it before storing it: the scale
    ``max |v| / FP8_MAX`` (at least ``MIN_SCALE``) at ``scale_ptr``, ``v * (1 / scale)`` clamped at
    ``q_row_ptr + cols``."""
    scale = tl.maximum(tl.max(tl.abs(values), axis=0) / FP8_MAX, MIN_SCALE)
    tl.store(scale_ptr, scale)
    q = tl.minimum(tl.maximum(values * reciprocal_rn(scale), -FP8_MAX), FP8_MAX)
    tl.store(q_row_ptr + cols, q.to(q_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def reciprocal_rn(scale):
    """``1 / scale`` rounded to nearest, as torch's reciprocal rounds it (Triton's "/" on a GPU may
    differ by an ulp). A row's elements then each take a multiply where a rounded division would
    cost them about a dozen instructions (SiLU-and-mul with float8 output: about 41 -> 28 an element in
    sm_90 code)."""
    return tl.math.div_rn(1.0, scale)
