"""SiLU-and-mul's arithmetic for Triton kernels, in one place: the SiLU-and-mul kernels
(kernels/fused_ops.py), the small-batch GEMM's gated load (kernels/fp8_gemm_triton.py) and the
one-row product's gated end (kernels/gemv_triton.py) call it, so their values are bitwise the same."""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["silu_and_mul_of", "silu_and_mul_values"]


@triton.jit
def silu_and_mul_of(gate, up, dtype: tl.constexpr):
    """``silu(gate).to(dtype) * up`` rounded to ``dtype``, of float32 ``gate`` and ``up`` that hold
    values of ``dtype`` (rounded to it before)."""
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    return (silu * up).to(dtype)


@triton.jit
def silu_and_mul_values(gate_up_row_ptr, cols, mask, width):
    """``silu(gate).to(dtype) * up`` rounded to the input dtype at ``gate_up_row_ptr + cols``:
    columns of one row whose halves (``width`` each) are gate and up, or a tile of such rows'
    pointers with ``cols`` 0 (the small-batch GEMM's gated load); zeros where ``mask`` is off."""
    dtype = gate_up_row_ptr.dtype.element_ty
    gate = tl.load(gate_up_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_row_ptr + width + cols, mask=mask, other=0.0).to(tl.float32)
    return silu_and_mul_of(gate, up, dtype)
