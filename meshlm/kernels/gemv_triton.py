"""One row times a weight on the CUDA cores: ``out = x @ (w * scale)^T (+ bias)`` for ``x`` [1, K].

The small-batch product (kernels/fp8_gemm_triton.py) pads its rows to 16 and multiplies on the
tensor cores; for a single row 15 of those 16 rows are padding, and a float8 weight is widened
to bf16 for the tensor cores first. Here each program holds a [BLOCK_N, BLOCK_K] tile of float32
products: every step it loads a weight tile, widens it to float32 (exactly, from float8 e4m3 or a
16-bit type) and multiplies-adds it with the row's BLOCK_K values, and at the end sums each
channel's products once. K may be cut into ``split_k`` runs of whole tiles, added up by the last
split to finish in a fixed order (a count of finished splits per tile of channels), so the result
does not depend on which split ends last; during a CUDA graph capture before any eager call, when
the counts cannot be made, one program a tile walks the whole of K instead. The
sums are float32; the scale, then the bias, multiply and add in float32 and the result is rounded
once to ``x``'s dtype, as the small-batch product does (the order of the additions differs).

It runs where a sweep on the card recorded a launch shape for the weight's shape
(``benchmarks/gemv_bench.py --write-config``: kernels/configs/*_weight_gemv_<card>.json). On an
H200, Llama-3-8B's four products of 32 layers, alone in a CUDA graph: 1.89 ms against the
small-batch product's 2.27 with float8 weights, 3.24 against 3.55 with bf16 weights (tiles swept
with the preload below; 2.00 and 3.36 ms with one weight tile in flight a program: float8 tiles
of 16 columns a thread also pass the row through shared memory at every step, which 3 tiles in
flight, ``num_stages``, hide for three of the four float8 shapes; bf16 gains less from 2). Each
program loads its first weight tile before waiting for the kernel ahead
(``triton_launch.weight_preload``): a batch-1 decode step 2.86 ms against 2.92 without it and
3.05 with the small-batch product (float8), 4.16 against 4.23 and 4.34 (bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshlm.kernels.gemm_epilogue import add_splits_if_last, scale_and_bias
from meshlm.kernels.silu_triton import silu_and_mul_of
from meshlm.kernels.triton_launch import launch_counters, programmatic_launch, weight_preload
from meshlm.kernels.triton_pdl import wait_for_previous_kernel
from meshlm.kernels.tuned_configs import device_name, tuned_entry

__all__ = ["GemvTiles", "NormIn", "RowLaunch", "gemv_config", "gemv_tiles", "one_row_add_norm",
           "one_row_gemm", "row_launch", "row_sums", "split_counters"]

# Registers a thread at most for the product that adds the residual (one_row_add_norm) with 4 warps
# a program: its end took the bf16 output and down products' 8 x 1024 tiles at 2 stages from 128
# registers to 156, 4 programs an SM to 3; capped, they compile to 128 without spilling (sm_90).
ADD_NORM_MAX_REGISTERS = 128
_MAX_SPLIT_TILES = 65536  # tiles of channels one split launch may count (256 KB of counters a device)
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True, slots=True)
class GemvTiles:
    """Output channels and K columns a program's tile holds, splits of K, warps; ``num_stages``: tiles
    in flight a program (more than one: copied ahead into shared memory by ``cp.async``, Triton's
    software pipeline)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1


def gemv_config(weight_dtype: torch.dtype) -> str:
    """The name under which the launch shapes are kept, by weight type (float8 or 16-bit)."""
    return "fp8_weight_gemv" if weight_dtype.itemsize == 1 else "bf16_weight_gemv"


def gemv_tiles(x: torch.Tensor, weight: torch.Tensor) -> GemvTiles | None:
    """The recorded launch shape for one row of ``x`` times ``weight`` on ``x``'s card, or None
    (the card, the shape or a float32 row not measured: the small-batch product runs)."""
    if x.shape[0] != 1 or x.dtype == torch.float32:
        return None
    tiles = tuned_entry(gemv_config(weight.dtype), device_name(x.device), weight.shape[0], weight.shape[1], 1)
    return None if tiles is None else GemvTiles(**tiles)


def split_counters(device: torch.device, num_tiles: int) -> torch.Tensor | None:
    """Zeroed int32 counts of finished splits, one per tile of channels, shared by the launches of
    the one-row kernels on ``device`` (each leaves them zero); None where they cannot be made now
    (a CUDA graph capture before any eager call): the launch then runs one split."""
    return launch_counters(_SPLIT_COUNTERS, device, _MAX_SPLIT_TILES, num_tiles)


@dataclass(frozen=True, slots=True)
class RowLaunch:
    """What a one-row kernel's launch passes besides its own operands: the splits of K (one where
    the counts cannot be made), the float32 partial sums [split_k, width] and counts of a split
    launch (placeholders otherwise), the weight's scale and its kind (2 one per channel, 1 one for
    all, 0 none), and whether the launch is programmatic (PDL)."""

    split_k: int
    k_per_split: int
    partial: torch.Tensor
    counters: torch.Tensor
    scale: torch.Tensor
    scale_kind: int
    pdl: bool


def row_launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, tiles: GemvTiles,
               num_tiles: int, partial_width: int) -> RowLaunch:
    """The launch of ``num_tiles`` tiles of ``tiles`` over ``weight`` [N, K], partial sums
    ``partial_width`` wide a split."""
    n, k = weight.shape
    counters = split_counters(x.device, num_tiles) if tiles.split_k > 1 else None
    split_k = tiles.split_k if counters is not None else 1
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), tiles.block_k) * tiles.block_k
    partial = torch.empty((split_k, partial_width) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    scale = weight.new_empty(0, dtype=torch.float32) if weight_scale is None else weight_scale.reshape(-1).float()
    scale_kind = 0 if weight_scale is None else 2 if scale.numel() == n and n > 1 else 1
    return RowLaunch(split_k, k_per_split, partial, counters if counters is not None else partial,
                     scale if scale.numel() else partial, scale_kind, programmatic_launch(x.device))


@dataclass(frozen=True, slots=True)
class NormIn:
    """An RMS norm a product takes in (kernels/one_row.py's SummedRow): the row it multiplies is
    ``s * g``, and its float32 sums are scaled by ``rsqrt(sum(sumsq) / K + eps)``, ``sumsq`` float32
    [tiles] the sums of ``s**2`` that the product before it stored."""

    sumsq: torch.Tensor
    eps: float


def norm_in_args(norm_in: NormIn | None, placeholder: torch.Tensor) -> dict:
    """The kernel arguments of ``norm_in``; without one a placeholder pointer, never read."""
    if norm_in is None:
        return dict(sumsq_in_ptr=placeholder, num_partials=1, eps=0.0, NORM_IN=False, BLOCK_P=1)
    num_partials = norm_in.sumsq.numel()
    return dict(sumsq_in_ptr=norm_in.sumsq, num_partials=num_partials, eps=norm_in.eps, NORM_IN=True,
                BLOCK_P=triton.next_power_of_2(num_partials))


def one_row_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, tiles: GemvTiles, gated: bool = False,
                 norm_in: NormIn | None = None) -> torch.Tensor:
    """``x`` [1, K] times ``weight`` [N, K] (float8 with ``weight_scale`` [N] or one element, or
    x's dtype with None), plus ``bias`` [N]: [1, N] in ``x``'s dtype. ``gated``: the weight's rows
    are gate then up, N/2 each, and the result is [1, N/2] ``silu(gate) * up`` (each rounded to x's
    dtype first, as SiLU-and-mul of the plain product reads them), bitwise what the plain product
    and the SiLU-and-mul kernel give; a program then holds BLOCK_N/2 gate rows and the up rows of
    the same channels, and K is not split (``tiles.split_k`` must be 1). ``norm_in``: the sums are
    scaled by its rstd before the weight's scale and the bias (``x`` is ``s * g``)."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, weight.shape)
    assert not gated or (n % 2 == 0 and tiles.block_n % 2 == 0 and tiles.split_k == 1), (n, tiles)
    out = torch.empty((1, n // 2 if gated else n), dtype=x.dtype, device=x.device)
    num_tiles = triton.cdiv(n // 2, tiles.block_n // 2) if gated else triton.cdiv(n, tiles.block_n)
    _launch(out, x, weight, weight_scale, bias, tiles, num_tiles, gated, norm_in_args(norm_in, out),
            dict(res_ptr=out, gamma_ptr=out, scaled_ptr=out, sumsq_out_ptr=out, ADD_NORM=False))
    return out


def one_row_add_norm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, tiles: GemvTiles,
                     residual: torch.Tensor, norm_weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x`` [1, K] times ``weight`` [N, K] (no bias; K not split) plus ``residual`` [1, N]:
    (``s`` [1, N], bitwise the product rounded to x's dtype plus the residual, rounded again as the
    norm kernel's sum; ``s * norm_weight`` [1, N] rounded to x's dtype; the float32 sums of ``s**2``
    over each tile of channels [tiles])."""
    n, k = weight.shape
    assert x.shape == (1, k) and x.stride(1) == 1 and weight.stride(1) == 1, (x.shape, weight.shape)
    assert residual.shape == (1, n) and residual.stride(1) == 1 and norm_weight.shape == (n,), (residual.shape, n)
    assert tiles.split_k == 1, tiles
    row, scaled = (torch.empty((1, n), dtype=x.dtype, device=x.device) for _ in range(2))
    num_tiles = triton.cdiv(n, tiles.block_n)
    sumsq = torch.empty(num_tiles, dtype=torch.float32, device=x.device)
    _launch(row, x, weight, weight_scale, None, tiles, num_tiles, False, norm_in_args(None, row),
            dict(res_ptr=residual, gamma_ptr=norm_weight, scaled_ptr=scaled, sumsq_out_ptr=sumsq, ADD_NORM=True))
    return row, scaled, sumsq


def _launch(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
            bias: torch.Tensor | None, tiles: GemvTiles, num_tiles: int, gated: bool, norm_in: dict,
            add_norm: dict) -> None:
    n, k = weight.shape
    launch = row_launch(x, weight, weight_scale, tiles, num_tiles, n)
    options = {}
    if add_norm["ADD_NORM"]:
        assert launch.split_k == 1, launch
        if tiles.num_warps == 4 and x.is_cuda:
            options["maxnreg"] = ADD_NORM_MAX_REGISTERS
    _one_row_kernel[(num_tiles, launch.split_k)](
        out, launch.partial, launch.counters, x, weight, launch.scale, bias if bias is not None else out,
        n, k, launch.k_per_split, weight.stride(0), **norm_in, **add_norm, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, IS_SPLIT=launch.split_k > 1, EVEN_K=k % tiles.block_k == 0, SCALE=launch.scale_kind,
        HAS_BIAS=bias is not None, PDL=launch.pdl, PRELOAD=weight_preload(x.device), GATED=gated,
        STAGES=tiles.num_stages, num_warps=tiles.num_warps, launch_pdl=launch.pdl, **options)  # placeholders never read


@triton.jit
def _one_row_kernel(out_ptr, partial_ptr, counter_ptr, x_ptr, w_ptr, scale_ptr, bias_ptr, N, K, k_per_split,
                    stride_wn, sumsq_in_ptr, num_partials, eps, res_ptr, gamma_ptr, scaled_ptr, sumsq_out_ptr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_SPLIT: tl.constexpr,
                    EVEN_K: tl.constexpr, SCALE: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PDL: tl.constexpr, PRELOAD: tl.constexpr = False,
                    GATED: tl.constexpr = False, STAGES: tl.constexpr = 1, NORM_IN: tl.constexpr = False,
                    BLOCK_P: tl.constexpr = 1, ADD_NORM: tl.constexpr = False):
    """NORM_IN: the sums scaled by the deferred norm's rstd (NormIn); ADD_NORM: the output plus the
    residual, with the next norm's scaled row and sums of squares (one_row_add_norm)."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    if GATED:  # rows 2i and 2i+1 of the tile: gate and up of output channel i (weight rows c and N/2 + c)
        pairs = tl.arange(0, BLOCK_N)
        channels = pid_n * (BLOCK_N // 2) + pairs // 2
        rows = channels % (N // 2) + (pairs % 2) * (N // 2)
    else:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the output channels (the weight's rows)
        rows = cols % N  # channels past N wrap to valid ones (loaded, never stored): no mask on the weight
    sums = row_sums(x_ptr, w_ptr, rows, pid_k * k_per_split, K, k_per_split, stride_wn, sumsq_in_ptr, num_partials,
                    eps, BLOCK_N, BLOCK_K, EVEN_K, PDL, PRELOAD, STAGES=STAGES, NORM_IN=NORM_IN,
                    BLOCK_P=BLOCK_P)[None, :]  # [1, BLOCK_N]
    if GATED:  # the kernel's end as an else branch: Triton compiles the code after a return too
        y = scale_and_bias(sums, rows, N, scale_ptr, bias_ptr, SCALE, HAS_BIAS).to(out_ptr.dtype.element_ty)
        gate, up = tl.split(tl.reshape(y.to(tl.float32), [BLOCK_N // 2, 2]))
        outs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + outs, silu_and_mul_of(gate, up, out_ptr.dtype.element_ty), mask=outs < N // 2)
    else:
        is_out = (cols < N)[None, :]
        out_ptrs = out_ptr + cols[None, :]
        if IS_SPLIT:
            tl.store(partial_ptr + pid_k * N + cols[None, :], sums, mask=is_out)  # partial [split_k, N]
            # the last split of these channels to finish adds up all of them, in order
            add_splits_if_last(out_ptrs, partial_ptr, cols[None, :], N, is_out, counter_ptr, pid_n, cols, N,
                               scale_ptr, bias_ptr, SCALE, HAS_BIAS, 1, BLOCK_N)
        else:
            y = scale_and_bias(sums, cols, N, scale_ptr, bias_ptr, SCALE, HAS_BIAS).to(out_ptr.dtype.element_ty)
            if ADD_NORM:
                _add_residual_for_norm(y, cols[None, :], is_out, out_ptrs, res_ptr, gamma_ptr, scaled_ptr,
                                       sumsq_out_ptr + pid_n)
            else:
                tl.store(out_ptrs, y, mask=is_out)


@triton.jit
def _add_residual_for_norm(y, cols, is_out, out_ptrs, res_ptr, gamma_ptr, scaled_ptr, sumsq_ptr):
    """The product ``y`` [1, BLOCK_N] (rounded) plus the residual at ``cols``, rounded to the output
    dtype as the norm kernel's sum ``s``, stored; ``s * gamma`` rounded, stored at ``scaled_ptr``; the
    sum of the tile's ``s**2`` stored at ``sumsq_ptr``."""
    dtype = out_ptrs.dtype.element_ty
    residual = tl.load(res_ptr + cols, mask=is_out, other=0.0)
    summed = (y.to(tl.float32) + residual.to(tl.float32)).to(dtype)
    tl.store(out_ptrs, summed, mask=is_out)
    s = tl.where(is_out, summed.to(tl.float32), 0.0)
    tl.store(sumsq_ptr, tl.sum(tl.sum(s * s, axis=1), axis=0))
    gamma = tl.load(gamma_ptr + cols, mask=is_out, other=0.0)
    tl.store(scaled_ptr + cols, (s * gamma.to(tl.float32)).to(dtype), mask=is_out)


@triton.jit
def row_sums(x_ptr, w_ptr, rows, k_start, K, k_per_split, stride_wn, sumsq_ptr, num_partials, eps,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
             PRELOAD: tl.constexpr, LAUNCH_NEXT: tl.constexpr = True, STAGES: tl.constexpr = 1,
             NORM_IN: tl.constexpr = False, BLOCK_P: tl.constexpr = 1):
    """float32 [BLOCK_N]: the row at ``x_ptr`` times weight ``rows`` (valid rows, [BLOCK_N]) over
    columns ``k_start`` to ``k_start + k_per_split`` (at most K), waiting for the kernel ahead
    first (``PRELOAD``: after loading the first weight tile; ``LAUNCH_NEXT``: see triton_pdl;
    ``STAGES``: GemvTiles.num_stages). ``NORM_IN``: times the deferred norm's rstd (NormIn), from
    the sums of squares at ``sumsq_ptr`` [num_partials], loaded as soon as the wait ends (their
    latency under the loop) and added after it."""
    ks = tl.arange(0, BLOCK_K)
    k_stop = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + (k_start + ks)[None, :]
    x_ptrs = x_ptr + k_start + ks
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    loop_start = k_start
    if PRELOAD:  # the first weight tile before the wait (masked: a split may hold no columns)
        is_k = (k_start + ks) < k_stop
        w = tl.load(w_ptrs, mask=is_k[None, :], other=0.0)
        wait_for_previous_kernel(PDL, LAUNCH_NEXT)
        partials = _load_partials(sumsq_ptr, num_partials, NORM_IN, BLOCK_P)
        x = tl.load(x_ptrs, mask=is_k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        loop_start = k_start + BLOCK_K
    else:
        wait_for_previous_kernel(PDL, LAUNCH_NEXT)
        partials = _load_partials(sumsq_ptr, num_partials, NORM_IN, BLOCK_P)
    for k in tl.range(loop_start, k_stop, BLOCK_K, num_stages=STAGES):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            is_k = (k + ks) < k_stop
            w = tl.load(w_ptrs, mask=is_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=is_k, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    sums = tl.sum(acc, axis=1)
    if NORM_IN:
        sums = sums * tl.rsqrt(tl.sum(partials, axis=0) / K + eps)
    return sums


@triton.jit
def _load_partials(sumsq_ptr, num_partials, NORM_IN: tl.constexpr, BLOCK_P: tl.constexpr):
    """The deferred norm's sums of squares [BLOCK_P] (zeros past ``num_partials``; one zero without NORM_IN)."""
    if NORM_IN:
        ps = tl.arange(0, BLOCK_P)
        partials = tl.load(sumsq_ptr + ps, mask=ps < num_partials, other=0.0)
    else:
        partials = tl.zeros([BLOCK_P], dtype=tl.float32)
    return partials
