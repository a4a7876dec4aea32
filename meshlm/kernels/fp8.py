"""FP8 (float8 e4m3) linear layers: quantization arithmetic and the scaled matrix product.

A quantized weight is ``w_fp8`` [N, K] with one float32 scale per output row, ``w ~ w_fp8 * scale[:, None]``.
Activations are quantized per row (per token) on the fly, or with one static scale when a checkpoint
calibrated it. The product ``y = (x_fp8 * sx) @ (w_fp8 * sw)^T`` then runs as:

- ``scaled``: on CUDA, ``torch._scaled_mm`` with rowwise scales (sx [M, 1], sw [1, N], bf16 out);
  elsewhere (the CPU, or shapes it refuses) the same quantize -> dequantize arithmetic in float32,
  so CPU tests run the quantization and the scales exactly as the GPU does.
  Where the kernel before the product (RMSNorm, SiLU-and-mul: kernels/fused_ops.py) can write its
  output quantized, the model asks ``takes_quantized_rows`` and hands over :class:`QuantizedRows`,
  and the product skips its own quantization (the same arithmetic, one pass over the rows fewer).
- ``weight_only``: activations stay in the model dtype; ``(x @ w_fp8^T) * sw + b`` with float32
  sums, rounded once to the model dtype. For batches of at most ``WEIGHT_ONLY_MAX_ROWS`` rows (decode
  steps): on CUDA one Triton kernel that streams the float8 weight and widens it in registers
  (kernels/fp8_gemm_triton.py), elsewhere the same arithmetic in torch, so the CPU tests take the
  path, and the numerics, that the GPU takes at each batch size.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshlm.kernels.tuned_configs import device_name, small_batch_gemm_config, tuned_entry

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# The smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12

# Batches of at most this many rows take the weight-only path (activations not quantized); larger
# ones the scaled product. A decode step's product is bound by the weight bytes, which the Triton
# kernel streams once with no activation quantization before it, while cuBLASLt's FP8 GEMM read them
# at 1.1-2.5 TB/s at M = 1 on an H200 (benchmarks/RESULTS.md); from some M on, the FP8 tensor-core
# rate of the scaled product wins. benchmarks/fp8_gemm_bench.py measures both and suggests the value.
WEIGHT_ONLY_MAX_ROWS = 16

# Whether layers take activations quantized by the kernel before them (takes_quantized_rows): that
# kernel then writes float8 rows and their scales, instead of model-dtype rows that a quantization
# kernel reads back. On by default; set_fused_quantization(False) turns it off (benchmarks compare).
_FUSED_QUANTIZATION = {"enabled": True}
# Whether small batches' down projections take silu(gate) * up as they load it (silu_and_mul_linear):
# one kernel fewer a layer. Off by default; set_fused_silu_product(True) turns it on (benchmarks compare).
_FUSED_SILU_PRODUCT = {"enabled": False}
# Whether torch._scaled_mm may accumulate in the tensor cores' own precision (use_fast_accum), which
# skips the periodic promotion of the partial sums to float32, as vLLM's FP8 products on Hopper do
# (its CUTLASS kernels' FP8FastAccum schedules). On by default: on an H200 it made FP8 128/128 7 %
# faster, and its error stays below the float8 rounding of the operands (tests/gpu/test_fp8_gpu.py);
# set_fast_accumulation(False) turns it off. The CPU's emulation sums in float32 either way.
_FAST_ACCUMULATION = {"enabled": True}


@dataclass(frozen=True, slots=True)
class QuantizedRows:
    """Activations quantized per row (per token), ``x ~ values * scale``: ``values`` float8 [M, K],
    ``scale`` float32 [M, 1]; ``dtype`` is the model dtype the rows had, the product's output dtype."""
    values: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def set_fused_quantization(enabled: bool) -> None:
    """Whether forward passes run (and CUDA graphs captured) from now on hand quantized rows to
    their FP8 products."""
    _FUSED_QUANTIZATION["enabled"] = enabled


def set_fast_accumulation(enabled: bool) -> None:
    """Whether FP8 products run (and CUDA graphs captured) from now on let ``torch._scaled_mm``
    accumulate in the tensor cores' precision (``use_fast_accum``)."""
    _FAST_ACCUMULATION["enabled"] = enabled


def set_fused_silu_product(enabled: bool) -> None:
    """Whether forward passes run (and CUDA graphs captured) from now on hand small batches'
    gate and up rows to the down projection's kernel (silu_and_mul_linear)."""
    _FUSED_SILU_PRODUCT["enabled"] = enabled


def takes_quantized_rows(num_rows: int, weight_scale: torch.Tensor | None, input_scale: torch.Tensor | None) -> bool:
    """Whether ``linear`` may be given ``num_rows`` rows as QuantizedRows: where it would quantize
    them per row itself, with the fusion on. The row count is the step's, known on the host, so
    CUDA graphs (one per batch size) capture the choice."""
    return _FUSED_QUANTIZATION["enabled"] and quantizes_per_row(num_rows, weight_scale, input_scale)


def quantizes_per_row(num_rows: int, weight_scale: torch.Tensor | None, input_scale: torch.Tensor | None) -> bool:
    """Whether ``linear`` quantizes ``num_rows`` rows each with its own scale: a float8 weight, no
    static input scale, more rows than the weight-only path takes."""
    return weight_scale is not None and input_scale is None and not use_weight_only(num_rows)


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [..., K] -> (float8 [..., K], float32 scales [..., 1]) with ``x ~ q * scale``, each row's
    largest magnitude mapped to ``FP8_MAX``. A row is multiplied by its scale's reciprocal (rounded
    once per row), not divided by the scale: one multiply an element instead of a division, which
    the kernels that quantize the rows they produce pay for every element. On CUDA, a matrix goes
    through one Triton kernel of the same arithmetic (kernels/fp8_quant_triton.py)."""
    if x.is_cuda and x.dim() == 2 and x.stride(1) == 1:
        from meshlm.kernels.fp8_quant_triton import quantize_rows_triton
        return quantize_rows_triton(x, FP8_DTYPE, FP8_MAX, MIN_SCALE)
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return quantize_with_reciprocal(x, scale), scale


def quantize_rows(x: torch.Tensor) -> QuantizedRows:
    """``x`` [..., K] as rows [M, K] quantized per row, as the scaled product would quantize them."""
    values, scale = quantize_per_row(x.reshape(-1, x.shape[-1]))  # [M, K], [M, 1]
    return QuantizedRows(values, scale, x.dtype)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to float8, saturated at +-``FP8_MAX`` (``scale`` broadcasts against ``x``)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_with_reciprocal(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 / scale)`` rounded to float8, saturated at +-``FP8_MAX``: the per-row quantization of
    activations (:func:`quantize_per_row`), with ``1 / scale`` rounded once."""
    return (x.float() * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (``scale`` broadcasts against ``q``)."""
    return (q.float() * scale).to(dtype)


def use_weight_only(num_rows: int) -> bool:
    """The path for a batch of ``num_rows`` rows: weight-only at or below WEIGHT_ONLY_MAX_ROWS."""
    return num_rows <= WEIGHT_ONLY_MAX_ROWS


def linear(x: torch.Tensor | QuantizedRows, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b``: for a weight in the model dtype (``weight_scale`` None) F.linear, or the
    small-batch kernel where a sweep on this card measured it faster than cuBLAS; else fp8_linear.
    ``x`` comes as QuantizedRows only where ``takes_quantized_rows`` said so."""
    if isinstance(x, QuantizedRows):
        return quantized_rows_linear(x, weight, weight_scale, bias, input_scale)
    if weight_scale is None:
        if not small_batch_kernel_wins(x, weight):
            return F.linear(x, weight, bias)
        from meshlm.kernels.fp8_gemm_triton import fp8_weight_gemm
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        return fp8_weight_gemm(rows, weight, None, bias).view(*x.shape[:-1], weight.shape[0])
    return fp8_linear(x, weight, weight_scale, bias, input_scale)


def silu_and_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                        weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``gate_up`` [M, 2K] times ``weight`` [N, K] by the small-batch kernel,
    which computes the product's input as it loads it, where ``linear`` of those rows would run
    that kernel (a 16-bit weight it was measured faster for, or a float8 weight's weight-only path
    on a GPU) and the fusion is on; else None (the caller runs SiLU-and-mul, then ``linear``)."""
    if not _FUSED_SILU_PRODUCT["enabled"] or gate_up.dim() != 2 or not gate_up.is_cuda:
        return None
    if weight_scale is None:
        if not small_batch_kernel_wins(gate_up, weight):
            return None
    elif not (use_weight_only(gate_up.shape[0]) and weight_only_kernel_runs(gate_up)):
        return None
    from meshlm.kernels.fp8_gemm_triton import fp8_weight_gemm
    return fp8_weight_gemm(gate_up, weight, weight_scale, gated=True)


def small_batch_kernel_wins(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A batch of at most WEIGHT_ONLY_MAX_ROWS rows times a weight of x's 16-bit dtype, on a GPU
    whose recorded launch shapes (kernels/configs/, written by ``fp8_gemm_bench.py --sweep
    --sweep-weight bf16 --write-config`` only where the kernel beat cuBLAS) name this shape."""
    if not x.is_cuda or weight.dtype != x.dtype or x.element_size() != 2:
        return False
    num_rows = x.numel() // x.shape[-1]
    if num_rows > WEIGHT_ONLY_MAX_ROWS:
        return False
    config = small_batch_gemm_config(weight.dtype)
    return tuned_entry(config, device_name(x.device), weight.shape[0], weight.shape[1], num_rows) is not None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for a float8 ``weight`` [N, K] with float32 ``weight_scale`` [N]; ``x`` [..., K]
    in the model dtype, the result [..., N] too. ``input_scale`` (one element): the checkpoint's static
    activation scale; None quantizes each row with its own scale."""
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if use_weight_only(rows.shape[0]):
        y = weight_only_linear(rows, weight, weight_scale, bias)  # input_scale unused: x stays as it is
    else:
        y = scaled_linear(rows, weight, weight_scale, input_scale)
        if bias is not None:
            y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def quantized_rows_linear(x: QuantizedRows, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_linear's scaled product of rows that arrive quantized: [M, K] -> [M, N] in ``x.dtype``."""
    assert x.values.dim() == 2 and quantizes_per_row(x.values.shape[0], weight_scale, input_scale), (
        f"rows {tuple(x.values.shape)} came quantized to a product that does not quantize them per row "
        f"(float8 weight: {weight_scale is not None}, static input scale: {input_scale is not None}, "
        f"weight-only up to {WEIGHT_ONLY_MAX_ROWS} rows)")
    y = scaled_product(x.values, x.scale, weight, weight_scale).to(x.dtype)
    return y if bias is None else y + bias


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [M, K] in the model dtype (not quantized) times the float8 ``weight`` [N, K]: float32
    sums of exact products, times ``weight_scale`` ([N] or one element), plus ``bias``, in float32,
    rounded once to ``x``'s dtype. On a GPU with FP8 support one Triton kernel computes it."""
    if weight_only_kernel_runs(x):
        from meshlm.kernels.fp8_gemm_triton import fp8_weight_gemm
        return fp8_weight_gemm(x, weight, weight_scale, bias)
    y = (x.float() @ weight.float().t()) * weight_scale.float().reshape(-1)  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] -> (float8 [M, K], float32 [M, 1]): per row, or with the static ``input_scale``."""
    if input_scale is None:
        return quantize_per_row(x)
    # _scaled_mm's rowwise form wants a contiguous [M, 1] scale
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return quantize_with_scale(x, scale), scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized activations times the float8 weight, both scales applied to the float32 sums."""
    x_q, x_scale = quantize_activations(x, input_scale)  # [M, K], [M, 1]
    return scaled_product(x_q, x_scale, weight, weight_scale).to(x.dtype)


def scaled_product(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                   weight_scale: torch.Tensor) -> torch.Tensor:
    """``(x_q * x_scale) @ (weight * weight_scale)^T`` for float8 ``x_q`` [M, K] and ``weight`` [N, K]:
    bf16 from ``torch._scaled_mm`` where it runs, else float32 from the emulation."""
    if can_use_scaled_mm(x_q, weight):
        return torch._scaled_mm(x_q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                                out_dtype=torch.bfloat16, use_fast_accum=_FAST_ACCUMULATION["enabled"])
    return emulated_scaled_mm(x_q, x_scale, weight, weight_scale)


def emulated_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                       weight_scale: torch.Tensor) -> torch.Tensor:
    """What ``torch._scaled_mm`` computes with rowwise scales, in float32: ``(x_q @ w_q^T) * sx * sw``."""
    return (x_q.float() @ weight.float().t()) * x_scale * weight_scale.float().view(1, -1)


def weight_only_kernel_runs(x: torch.Tensor) -> bool:
    """Whether weight_only_linear gives ``x`` to the small-batch kernel: on a GPU with FP8 support."""
    return x.is_cuda and _has_fp8_tensor_cores(x.device.index or 0)


def can_use_scaled_mm(x_q: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._scaled_mm`` on CUDA wants K and N multiples of 16 (M is free) and a card with FP8
    tensor cores (compute capability 8.9 or newer)."""
    if x_q.device.type != "cuda" or x_q.shape[1] % 16 or weight.shape[0] % 16:
        return False
    return _has_fp8_tensor_cores(x_q.device.index or 0)


@functools.cache
def _has_fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def per_token_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T`` with the activations quantized per token whatever the row count (F.linear for a weight
    in the model dtype): one expert's rows, which must round as :func:`fp8_bmm` rounds them."""
    if weight_scale is None:
        return F.linear(x, weight)
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    return scaled_linear(rows, weight, weight_scale).view(*x.shape[:-1], weight.shape[0])


# --- experts: one quantized weight per expert ---------------------------------------------------
def bmm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x[e] @ weight[e]^T`` for every e: ``x`` [E, M, K], ``weight`` [E, N, K] -> [E, M, N]."""
    if weight_scale is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return fp8_bmm(x, weight, weight_scale)


def fp8_bmm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Batched ``x[e] @ weight[e]^T``: ``x`` [E, M, K] in the model dtype, ``weight`` float8 [E, N, K],
    ``weight_scale`` [E, N] -> [E, M, N]. Activations quantized per row, the product in the model
    dtype with exact float8 values widened (no host synchronisation: fit for CUDA graphs)."""
    x_q, x_scale = quantize_per_row(x)  # [E, M, K], [E, M, 1]
    y = torch.bmm(x_q.to(x.dtype), weight.to(x.dtype).transpose(1, 2))  # [E, M, N]
    return (y.float() * x_scale * weight_scale.float().unsqueeze(1)).to(x.dtype)
