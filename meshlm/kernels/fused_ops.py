"""The small ops of a decoder layer, two ways: plain torch (``TorchOps``) and fused Triton kernels
(``TritonOps``).

Outside the matmuls a decoder layer runs a handful of small ops, each several torch kernels: the
residual add and RMSNorm before attention and before the MLP, rotary embeddings on q and k followed
by the store of k and v into the paged KV cache, and SiLU(gate) * up. At small batches each kernel
moves few bytes, so their number sets their cost.
``TritonOps`` runs each op as one kernel (fp32 inside, the input dtype out; one program per token
row, except SiLU-and-mul, which splits a row over several; rotary and the KV-cache store are one
kernel); ``TorchOps`` is the unfused torch code, the CPU's path and the reference the kernels are
tested against.

The kernels round where the torch code rounds (the normalised row is cast to the input dtype before
the weight multiplies it, as transformers does; SiLU is cast before it multiplies ``up``), so the
two paths differ only in the order of fp32 operations (reductions, fused multiply-adds). They make
no host decision from device values, so CUDA graphs capture them. ``select_ops`` picks one at
build time (TritonOps by default on CUDA) and the model holds it (``LlamaForCausalLM.use_ops``).

Before an FP8 product that quantizes its input per token (kernels/fp8.py), the norm and SiLU-and-mul
come in a ``*_quantized`` form that returns float8 rows and their scales (``fp8.QuantizedRows``):
TorchOps quantizes its result as the product would, TritonOps quantizes the row before storing it,
so the model-dtype row is neither written nor read back.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from meshlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, QuantizedRows, quantize_rows
from meshlm.kernels.kv_quant import is_fp8_kv, quantize_kv
from meshlm.kernels.triton_launch import programmatic_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: TorchOps alone
    triton = None

log = logging.getLogger("meshlm")

# Rows wider than this fall back to torch: one program holds a whole row in registers.
MAX_FUSED_WIDTH = 65536


class TorchOps:
    """The unfused torch math of the small ops (the default, and the kernels' reference)."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * rmsnorm(x)``: normalised in fp32, cast to x's dtype, then scaled (transformers)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(``rms_norm(x + residual)``, ``x + residual``); with no residual (a stage's first layer)
        (``rms_norm(x)``, ``x``)."""
        if residual is not None:
            x = x + residual
        return self.rms_norm(x, weight, eps), x

    def add_rms_norm_quantized(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                               eps: float) -> tuple[QuantizedRows, torch.Tensor]:
        """``add_rms_norm`` with the normed rows quantized per row to float8, as the FP8 product
        after it would quantize them (``fp8.quantize_rows``)."""
        normed, residual = self.add_rms_norm(x, residual, weight, eps)
        return quantize_rows(normed), residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a merged ``[num_tokens, 2 * inter]`` projection -> ``[num_tokens, inter]``."""
        gate, up = gate_up.chunk(2, dim=-1)  # [num_tokens, inter] each
        return F.silu(gate) * up

    def silu_and_mul_quantized(self, gate_up: torch.Tensor) -> QuantizedRows:
        """``silu_and_mul`` quantized per row to float8, as ``add_rms_norm_quantized``."""
        return quantize_rows(self.silu_and_mul(gate_up))

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half rotary embedding of q ``[num_tokens, num_heads, head_dim]`` and k
        ``[num_tokens, num_kv_heads, head_dim]``; ``cos``/``sin`` are fp32 ``[max_positions, head_dim / 2]``
        tables indexed by ``positions`` ``[num_tokens]``. Computed in fp32, returned in q's and k's dtypes."""
        cos = cos[positions].unsqueeze(1)  # [num_tokens, 1, head_dim / 2]
        sin = sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotary_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None, k_out: torch.Tensor | None = None) -> torch.Tensor:
        """``rotary`` on q and k, then the rotated k and v ``[num_tokens, num_kv_heads, head_dim]``
        stored into the paged cache ``[num_blocks, block_size, num_kv_heads, head_dim]`` at
        ``slot_mapping`` ``[num_tokens]`` (quantized by ``k_scale``/``v_scale`` into an fp8 cache);
        returns the rotated q. ``k_out`` (k's shape and dtype): where the rotated k is also stored."""
        q, k = self.rotary(positions, q, k, cos, sin)
        write_kv_cache(k_cache, v_cache, k, v, slot_mapping, k_scale, v_scale)
        if k_out is not None:
            k_out.copy_(k)
        return q


def write_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Store this step's keys and values ``[num_tokens, num_kv_heads_per_rank, head_dim]`` at their
    slots (slot = block * block_size + offset in the block). An fp8 cache stores them quantized by
    their head's scale ``[num_kv_heads_per_rank]`` (kernels/kv_quant.py)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    if is_fp8_kv(k_cache):
        k, v = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
        # index_copy_ has no float8 kernel on the CPU: copy the bytes
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


TORCH_OPS = TorchOps()


def select_ops(enable_fused_kernels: bool | None, device: torch.device) -> TorchOps:
    """``None`` (auto): TritonOps on a CUDA device when Triton imports, else TorchOps. ``True``:
    TritonOps, falling back to TorchOps with a warning where they cannot run. ``False``: TorchOps."""
    if enable_fused_kernels is None:
        enable_fused_kernels = device.type == "cuda" and triton is not None
    if not enable_fused_kernels:
        return TORCH_OPS
    if device.type != "cuda" or triton is None:
        log.warning("enable_fused_kernels needs a CUDA device and Triton (device %s, triton %s); "
                    "running the torch ops", device, "present" if triton is not None else "missing")
        return TORCH_OPS
    return TritonOps()


class TritonOps(TorchOps):
    """The same ops as one Triton kernel each; shapes the kernels do not take go to TorchOps.
    ``row_warps``: the warps of the norm and float8 SiLU-and-mul kernels, whose programs hold a
    whole row (None: :func:`row_warps` and :func:`silu_quantized_warps` of the row's width;
    benchmarks/row_kernels_bench.py times others)."""

    name = "triton"

    def __init__(self, row_warps: int | None = None):
        self.row_warps = row_warps

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return self.add_rms_norm(x, None, weight, eps)[0]

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        if not _norm_takes(x, residual, weight):
            return super().add_rms_norm(x, residual, weight, eps)
        rows = _as_rows(x)  # [num_rows, width]
        out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
        summed = _launch_add_rms_norm(out, None, rows, residual, weight, eps, self.row_warps)
        return out.view(x.shape), x if summed is None else summed.view(x.shape)

    def add_rms_norm_quantized(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                               eps: float) -> tuple[QuantizedRows, torch.Tensor]:
        """One kernel: the normed row is quantized in registers, never stored in the model dtype."""
        if not _norm_takes(x, residual, weight):
            return super().add_rms_norm_quantized(x, residual, weight, eps)
        rows = _as_rows(x)  # [num_rows, width]
        out = torch.empty(rows.shape, dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
        summed = _launch_add_rms_norm(out, scale, rows, residual, weight, eps, self.row_warps)
        return QuantizedRows(out, scale, x.dtype), x if summed is None else summed.view(x.shape)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        width = gate_up.shape[-1] // 2
        if gate_up.numel() == 0:
            return super().silu_and_mul(gate_up)
        rows = _as_rows(gate_up)  # [num_rows, 2 * inter]
        out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
        # A row of a large MLP is spread over several programs, so a decode of one token still
        # fills more than one SM.
        block = min(1024, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, block))](
            out, rows, out.stride(0), rows.stride(0), width, BLOCK=block, num_warps=4, **_pdl(rows.device))
        return out.view(*gate_up.shape[:-1], width)

    def silu_and_mul_quantized(self, gate_up: torch.Tensor) -> QuantizedRows:
        """One program per row, which holds the whole row to find its largest magnitude."""
        width = gate_up.shape[-1] // 2
        if gate_up.numel() == 0 or width > MAX_FUSED_WIDTH:
            return super().silu_and_mul_quantized(gate_up)
        rows = _as_rows(gate_up)  # [num_rows, 2 * inter]
        out = torch.empty((rows.shape[0], width), dtype=FP8_DTYPE, device=gate_up.device)
        scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=gate_up.device)
        block = triton.next_power_of_2(width)
        _silu_and_mul_quantized_kernel[(rows.shape[0],)](
            out, scale, rows, out.stride(0), rows.stride(0), width, BLOCK=block, FP8_MAX=FP8_MAX,
            MIN_SCALE=MIN_SCALE, num_warps=self.row_warps or silu_quantized_warps(block), **_pdl(rows.device))
        return QuantizedRows(out, scale, gate_up.dtype)

    def rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        if num_tokens == 0 or head_dim % 2 or cos.stride(1) != 1 or sin.stride() != cos.stride():
            return super().rotary(positions, q, k, cos, sin)
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        half = head_dim // 2
        half_block, heads_block = triton.next_power_of_2(half), triton.next_power_of_2(num_heads)
        rotary_kernel[(num_tokens,)](
            q_out, k_out, q, k, cos, sin, positions,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
            num_heads, num_kv_heads,
            HALF=half, HALF_BLOCK=half_block, HEADS_BLOCK=heads_block,
            KV_HEADS_BLOCK=triton.next_power_of_2(num_kv_heads), num_warps=row_warps(heads_block * half_block),
            **_pdl(q.device))
        return q_out, k_out


    def rotary_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None, k_out: torch.Tensor | None = None) -> torch.Tensor:
        """One kernel: rotate q into a new tensor, rotate k and store it and v straight into the
        cache at their slots (no rotated k tensor unless ``k_out`` asks for one, no separate cache
        writes); an fp8 cache gets them divided by their head's scale and clamped to its range."""
        num_tokens, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        is_fp8 = is_fp8_kv(k_cache)
        takes_kv = v_cache.dtype == k_cache.dtype and (is_fp8 or (k_cache.dtype == k.dtype and v.dtype == k.dtype))
        if (num_tokens == 0 or head_dim % 2 or cos.stride(1) != 1 or sin.stride() != cos.stride()
                or k_cache.stride(3) != 1 or v_cache.stride(3) != 1 or not takes_kv
                or k_cache.shape != v_cache.shape or (k_out is not None and k_out.stride(2) != 1)):
            return super().rotary_and_cache(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping,
                                            k_scale, v_scale, k_out)
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        half = head_dim // 2
        half_block, heads_block = triton.next_power_of_2(half), triton.next_power_of_2(num_heads)
        if not is_fp8:
            k_scale = v_scale = k_cache  # pointers the kernel never reads
        k_rows = q_out if k_out is None else k_out  # never written through without k_out
        rotary_cache_kernel[(num_tokens,)](
            q_out, k_cache, v_cache, k_rows, q, k, v, cos, sin, positions, slot_mapping, k_scale, v_scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_rows.stride(0), k_rows.stride(1), cos.stride(0),
            num_heads, num_kv_heads, k_cache.shape[1],
            HALF=half, HALF_BLOCK=half_block, HEADS_BLOCK=heads_block,
            KV_HEADS_BLOCK=triton.next_power_of_2(num_kv_heads), IS_FP8=is_fp8, STORE_K=k_out is not None,
            num_warps=row_warps(heads_block * half_block), **_pdl(q.device))
        return q_out


def _norm_takes(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """Whether the norm kernel takes these operands: rows of at most MAX_FUSED_WIDTH, one dtype."""
    return (0 < x.numel() and x.shape[-1] <= MAX_FUSED_WIDTH and weight.dtype == x.dtype and weight.stride(0) == 1
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)))


def _launch_add_rms_norm(out: torch.Tensor, scale: torch.Tensor | None, rows: torch.Tensor,
                         residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                         num_warps: int | None) -> torch.Tensor | None:
    """The norm of ``rows`` (+ ``residual``) [num_rows, width] into ``out``: in the model dtype, or,
    given ``scale`` [num_rows, 1], quantized to float8 per row, in ``num_warps`` (None: the row's
    default). Returns the sum (None without residual)."""
    has_residual, is_quantized = residual is not None, scale is not None
    residual_rows = _as_rows(residual) if has_residual else rows
    # Without a residual the kernel neither reads nor writes through the residual pointers, and
    # unquantized it never writes a scale.
    summed = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device) if has_residual else rows
    block = triton.next_power_of_2(rows.shape[1])
    _add_rms_norm_kernel[(rows.shape[0],)](
        out, summed, scale if is_quantized else weight, rows, residual_rows, weight,
        out.stride(0), summed.stride(0), rows.stride(0), residual_rows.stride(0), rows.shape[1], eps,
        HAS_RESIDUAL=has_residual, QUANTIZE=is_quantized, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK=block,
        num_warps=num_warps or row_warps(block), **_pdl(rows.device))
    return summed if has_residual else None


def silu_quantized_warps(block: int) -> int:
    """Warps for SiLU-and-mul with float8 output, a program a row of ``block`` outputs: about 64
    outputs a thread (it loads gate and up), 1 to 16 warps. At the 8B shape's 14336 on an H200: 8
    warps 144.5 us for 8100 rows, 16 warps 150.4 (34.6 and 33.9 us for 1712; row_kernels_bench.py)."""
    return max(1, min(16, block // 2048))


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[num_rows, width]`` with unit stride along the width; a view where one exists
    (e.g. a column slice of a wider tensor keeps its row stride), else a copy."""
    x = _unit_last_stride(x)
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])


def _pdl(device: torch.device) -> dict:
    """The launch arguments of programmatic dependent launch (kernels/triton_launch.py)."""
    enabled = programmatic_launch(device)
    return {"PDL": enabled, "launch_pdl": enabled}


if triton is not None:
    from meshlm.kernels.fp8_quant_triton import row_warps, store_quantized_row
    from meshlm.kernels.rotary_triton import rotary_cache_kernel, rotary_kernel
    from meshlm.kernels.silu_triton import silu_and_mul_values
    from meshlm.kernels.triton_pdl import wait_for_previous_kernel

    @triton.jit
    def _add_rms_norm_kernel(out_ptr, residual_out_ptr, scale_ptr, x_ptr, residual_ptr, weight_ptr,
                             stride_out, stride_residual_out, stride_x, stride_residual, width, eps,
                             HAS_RESIDUAL: tl.constexpr, QUANTIZE: tl.constexpr, FP8_MAX: tl.constexpr,
                             MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One row: ``s = x + residual`` (stored, rounded to the input dtype), then
        ``weight * (s * rsqrt(mean(s^2) + eps)).to(dtype)``, rounded to the input dtype; ``QUANTIZE``:
        that row quantized into the float8 ``out``, its scale at ``scale_ptr`` [num_rows]."""
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        dtype = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
            summed = (x + residual.to(tl.float32)).to(dtype)
            tl.store(residual_out_ptr + row * stride_residual_out + cols, summed, mask=mask)
            x = summed.to(tl.float32)
        mean_square = tl.sum(x * x, axis=0) / width
        normed = (x * tl.rsqrt(mean_square + eps)).to(dtype).to(tl.float32)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        out = (weight * normed).to(dtype)
        if QUANTIZE:  # the model-dtype row, as the unfused quantization would read it back
            store_quantized_row(out.to(tl.float32), out_ptr + row * stride_out, cols, mask, scale_ptr + row,
                                FP8_MAX, MIN_SCALE)
        else:
            tl.store(out_ptr + row * stride_out + cols, out, mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(out_ptr, gate_up_ptr, stride_out, stride_gate_up, width, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
        """``BLOCK`` columns of one row: ``silu(gate).to(dtype) * up``, gate and up the row's two halves."""
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        values = silu_and_mul_values(gate_up_ptr + row * stride_gate_up, cols, mask, width)
        tl.store(out_ptr + row * stride_out + cols, values, mask=mask)

    @triton.jit
    def _silu_and_mul_quantized_kernel(out_ptr, scale_ptr, gate_up_ptr, stride_out, stride_gate_up, width,
                                       BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                                       PDL: tl.constexpr):
        """One whole row of ``silu(gate).to(dtype) * up``, quantized into the float8 ``out``, its
        scale at ``scale_ptr`` [num_rows]."""
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        values = silu_and_mul_values(gate_up_ptr + row * stride_gate_up, cols, mask, width).to(tl.float32)
        store_quantized_row(values, out_ptr + row * stride_out, cols, mask, scale_ptr + row, FP8_MAX, MIN_SCALE)
