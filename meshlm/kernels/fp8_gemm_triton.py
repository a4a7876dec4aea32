"""The product of small batches with a float8 weight: ``out = x @ (w * scale)^T (+ bias)``.

``x`` [M, K] stays in the model dtype (bf16, fp16 or fp32; not quantized), ``w`` [N, K] is float8
e4m3 with a float32 scale per output channel [N] (or one for the whole tensor). A decode step's
linear layers have a few rows and read megabytes of weight, so the product is bound by the weight
bytes: the kernel streams each weight tile once, widens the float8 values in registers to ``x``'s
dtype (exactly: e4m3 fits in bf16, fp16 and fp32) and multiplies on the tensor cores with
``tl.dot``, the rows padded to ``BLOCK_M`` (at least 16). The sums are float32; the scale, then the
bias, multiply and add in float32, and the result is rounded once to ``x``'s dtype, as
:func:`meshlm.kernels.fp8.weight_only_linear` computes on the CPU.

Grid: (column tile of ``BLOCK_N`` output channels, split of K, row tile). A program walks its
split of K ``BLOCK_K`` columns at a time through a ``num_stages``-deep software pipeline. When the
column tiles are too few to keep every SM streaming (a narrow weight, or a tensor-parallel shard of
one), K is cut into ``split_k`` runs of whole tiles: each split writes its float32 sums to a buffer
and counts itself done on an atomic counter of its output tile; the last one to finish adds the
splits in a fixed order (deterministic, unlike atomic sums), scales, adds the bias, rounds, and
zeroes the counter for the next launch. (A second small kernel does that instead during a CUDA
graph capture that comes before any eager call, when the counters cannot be made.) The launch
shape depends on (M, N, K, dtype, SM count) only, and nothing is read back to the host, so CUDA
graphs capture the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshlm.kernels import gemv_triton
from meshlm.kernels.gemm_epilogue import add_splits_if_last, scale_and_bias
from meshlm.kernels.triton_launch import dot_precision, launch_counters, num_sms, programmatic_launch
from meshlm.kernels.silu_triton import silu_and_mul_values
from meshlm.kernels.triton_pdl import wait_for_previous_kernel
from meshlm.kernels.tuned_configs import device_name, small_batch_gemm_config, tuned_entry

__all__ = ["FP8GemmTiles", "choose_tiles", "fp8_weight_gemm"]

# Column tiles below this many per SM leave SMs idle or short of loads in flight: K is split until
# the programs reach it (each split at least _MIN_K_PER_SPLIT columns).
_PROGRAMS_PER_SM = 2
_MIN_K_PER_SPLIT = 1024
_MAX_SPLIT_K = 16
# Shared memory the pipelined tiles of a 16-bit x may take.
_SHARED_BYTES = 96 * 1024
# Output tiles one split-K launch may have (counters of the in-kernel reduction: 256 KB per device).
_MAX_SPLIT_TILES = 65536
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True, slots=True)
class FP8GemmTiles:
    """Launch shape: output channels and K columns per tile, splits of K, warps, pipeline depth;
    ``swap_ab``: multiply ``w @ x^T`` (the weight tile as the MMA's A operand, its channels as the
    MMA's rows) instead of ``x @ w^T``; ``asm_widen``: for bf16 ``x`` on the GPU, widen the float8
    weight by moving bits (_E4M3_TO_BF16_X4) instead of the conversion unit's float8 -> fp16 -> bf16;
    ``serial_reduce``: the last split of a tile to finish adds up the splits (one launch) instead
    of a second kernel; ``l2_prefetch``: before waiting for the kernel ahead (programmatic
    dependent launch), ask L2 for the program's weight rows, so the weight streams in while that
    kernel ends."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False
    asm_widen: bool = True
    serial_reduce: bool = True
    l2_prefetch: bool = False


@triton.jit
def _fp8_weight_gemm_kernel(
        out_ptr, partial_ptr, counter_ptr, x_ptr, w_ptr, scale_ptr, bias_ptr, M, N, K, k_per_split,
        stride_xm, stride_wn, stride_om,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_SPLIT: tl.constexpr,
        SERIAL_REDUCE: tl.constexpr,
        EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, ASM_WIDEN: tl.constexpr, SCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, PDL: tl.constexpr,
        L2_PREFETCH: tl.constexpr, GATED: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Channels past the end wrap to valid ones (loaded, never stored): the weight needs no mask, so
    # each thread reads 16 consecutive float8 bytes in one instruction. Rows past M are masked, which
    # is uniform along K (the loads stay vectorized) and reads nothing for them: at M = 1, 15 of the
    # 16 rows of the tile.
    is_row = rows < M
    x_rows = rows.to(tl.int64)
    w_rows = (cols % N).to(tl.int64)
    k_start = pid_k * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    if L2_PREFETCH:  # the weight does not depend on the kernel before: fetch it while that one ends
        row_bytes = (k_stop - k_start) * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
        _prefetch_rows_to_l2(w_ptr + w_rows * stride_wn + k_start, row_bytes)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + (k_start + ks)[None, :]  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + (k_start + ks)[None, :]  # [BLOCK_N, BLOCK_K]
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    wait_for_previous_kernel(PDL)
    for k in range(k_start, k_stop, BLOCK_K):
        if EVEN_K:
            x = _load_x(x_ptrs, is_row[:, None], K, GATED)
            w = tl.load(w_ptrs)
        else:
            is_k = (k + ks) < k_stop
            x = _load_x(x_ptrs, is_row[:, None] & is_k[None, :], K, GATED)
            w = tl.load(w_ptrs, mask=is_k[None, :], other=0.0)
        acc = _accumulate(acc, x, w, ASM_WIDEN, DOT_IN_FP32, SWAP_AB, DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    is_out = is_row[:, None] & (cols < N)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if IS_SPLIT:
        # partial [split_k, M, N]
        offsets = (pid_k * M + rows).to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(partial_ptr + offsets, acc, mask=is_out)
        if SERIAL_REDUCE:  # the last split of this tile to finish adds up all of them
            add_splits_if_last(out_ptrs, partial_ptr, rows.to(tl.int64)[:, None] * N + cols[None, :],
                               M * N, is_out, counter_ptr, pid_m * tl.num_programs(0) + pid_n, cols, N,
                               scale_ptr, bias_ptr, SCALE, HAS_BIAS, BLOCK_M, BLOCK_N)
    else:
        y = scale_and_bias(acc, cols, N, scale_ptr, bias_ptr, SCALE, HAS_BIAS)
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=is_out)


# float8 e4m3 -> bf16 for four values in one 32-bit register. A bf16 holding the float8's sign, and
# its 4 exponent and 3 mantissa bits as the low exponent and high mantissa bits, is w * 2^-120
# exactly (its exponent bias is 127, not 7; float8 subnormals become bf16 subnormals), so: the
# high byte of each bf16 is the sign and the top 3 exponent bits, the low byte the last exponent bit
# and the mantissa (shifts and masks on all four bytes at once), two byte permutes (prmt) pair them,
# and an fma by 2^120 (0x7B80) and -0 gives w. Nine integer and bf16x2 instructions for four values,
# where the conversion unit takes one per value (fp16 -> bf16), at a lower rate than integer ones.
_E4M3_TO_BF16_X4 = tl.constexpr("""{
.reg .b32 t, hb, lb, lo, hi, two120, neg0;
mov.b32 two120, 0x7B807B80;
mov.b32 neg0, 0x80008000;
shr.b32 t, $2, 4;
and.b32 t, t, 0x07070707;
and.b32 hb, $2, 0x80808080;
or.b32 hb, hb, t;
shl.b32 lb, $2, 4;
and.b32 lb, lb, 0xF0F0F0F0;
prmt.b32 lo, lb, hb, 0x5140;
prmt.b32 hi, lb, hb, 0x7362;
fma.rn.bf16x2 $0, lo, two120, neg0;
fma.rn.bf16x2 $1, hi, two120, neg0;
}""")


@triton.jit
def _accumulate(acc, x, w, ASM_WIDEN: tl.constexpr, DOT_IN_FP32: tl.constexpr, SWAP_AB: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """``acc`` plus the product of an x tile and a weight tile (widened to x's dtype)."""
    w = _widen_fp8(w, x.dtype, ASM_WIDEN)
    if DOT_IN_FP32:  # the CPU interpreter multiplies 16-bit bit patterns as integers
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    # One return after the branches: Triton's compiler goes on past a return inside a constexpr if
    # (the other product would be traced too, with the wrong accumulator shape).
    if SWAP_AB:  # the weight as the tensor cores' A operand (its channels as MMA rows)
        acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    else:
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    return acc


@triton.jit
def _load_x(x_ptrs, mask, K, GATED: tl.constexpr):
    """A tile of x; ``GATED``: x is ``silu(gate).to(dtype) * up`` of rows whose halves are gate and
    up (``K`` columns each), by the SiLU-and-mul kernel's own arithmetic (kernels/fused_ops.py)."""
    if GATED:
        return silu_and_mul_values(x_ptrs, 0, mask, K)
    return tl.load(x_ptrs, mask=mask, other=0.0)


@triton.jit
def _prefetch_rows_to_l2(row_ptrs, num_bytes):
    """Ask L2 for ``num_bytes`` (a multiple of 16) from each of ``row_ptrs`` on: one bulk prefetch a row,
    nothing waits for it."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                              [row_ptrs.to(tl.int64, bitcast=True), tl.full(row_ptrs.shape, num_bytes, tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _widen_fp8(w, dtype: tl.constexpr, IN_ASM: tl.constexpr):
    """float8 e4m3 ``w`` -> ``dtype``, exactly (every e4m3 value is a bf16, fp16 and fp32 value). On
    the GPU, to bf16 by moving bits (_E4M3_TO_BF16_X4); the interpreter runs no assembly. A weight
    already in ``dtype`` (IN_ASM False) passes as it is."""
    if IN_ASM and dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_E4M3_TO_BF16_X4, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                         dtype=tl.bfloat16, is_pure=True, pack=4)
    return w.to(dtype)


@triton.jit
def _reduce_splits_kernel(out_ptr, partial_ptr, scale_ptr, bias_ptr, M, N, stride_om,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, SCALE: tl.constexpr,
                          HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    is_col = cols < N
    acc = tl.zeros([1, BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # in order: the same sum every run
        offsets = (s * M + row).to(tl.int64) * N + cols
        acc += tl.load(partial_ptr + offsets, mask=is_col, other=0.0)[None, :]
    y = scale_and_bias(acc, cols, N, scale_ptr, bias_ptr, SCALE, HAS_BIAS)
    tl.store(out_ptr + row.to(tl.int64) * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=is_col[None, :])


def choose_tiles(num_rows: int, n: int, k: int, dtype: torch.dtype, num_sms: int,
                 device: str = "", weight_dtype: torch.dtype = torch.float8_e4m3fn) -> FP8GemmTiles:
    """The launch shape for ``num_rows`` x ``k`` times ``n`` x ``k`` on ``num_sms`` SMs: the one
    measured fastest on ``device`` (a card's name) for this shape if a sweep recorded it
    (:mod:`meshlm.kernels.tuned_configs`, 16-bit ``x``), else the rule below.

    16-bit ``x``: tiles of 64 channels x 256 columns (each thread loads 16 float8 bytes at a time)
    in up to 4 pipeline stages (96 KB of shared memory, fewer stages for taller x tiles), 4 warps.
    The widening of the weight, not the product, costs the instructions: each warp multiplies the
    same x tile by its own 16 channels, so wider tiles spread x's handling over more weight bytes
    (sm_90 code: 0.12 warp instructions per weight byte at 64 channels, 0.16 at 32, 0.31 at 16
    with 4 warps). Fewer than ``_PROGRAMS_PER_SM`` programs per SM split K. fp32 ``x`` (tests):
    16 x 64 tiles in two stages, which keep its twice larger tiles within shared memory."""
    config = small_batch_gemm_config(weight_dtype)
    tuned = tuned_entry(config, device, n, k, num_rows) if dtype != torch.float32 else None
    if tuned is not None:
        return FP8GemmTiles(**tuned)
    m_tiles = triton.cdiv(num_rows, _block_m(num_rows))
    if dtype == torch.float32:
        block_n, block_k, num_stages = 16, 64, 2
    else:
        block_n, block_k = 64, 256
        stage_bytes = _block_m(num_rows) * block_k * dtype.itemsize + block_n * block_k
        num_stages = max(2, min(4, _SHARED_BYTES // stage_bytes))
    programs = triton.cdiv(n, block_n) * m_tiles
    split_k = _split_k(programs, k, block_k, num_sms)
    return FP8GemmTiles(block_n=block_n, block_k=block_k, split_k=split_k, num_stages=num_stages)


def _split_k(programs: int, k: int, block_k: int, num_sms: int) -> int:
    """Splits of K that bring ``programs`` up to ``_PROGRAMS_PER_SM`` per SM, each at least
    ``_MIN_K_PER_SPLIT`` columns; rounded up to a count that cuts K's tiles evenly where one is
    near (the programs of a launch run together, so the longest split sets its time)."""
    target = _PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    wanted = max(1, min(triton.cdiv(target, programs), k // _MIN_K_PER_SPLIT, _MAX_SPLIT_K))
    k_tiles = triton.cdiv(k, block_k)
    even = [s for s in range(wanted, min(2 * wanted, _MAX_SPLIT_K, k_tiles) + 1) if k_tiles % s == 0]
    return even[0] if even else wanted


def _block_m(num_rows: int) -> int:
    """Rows per tile: at least 16 (the tensor cores' smallest), at most 64."""
    return min(64, max(16, triton.next_power_of_2(num_rows)))


def fp8_weight_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                    bias: torch.Tensor | None = None, tiles: FP8GemmTiles | None = None,
                    gated: bool = False) -> torch.Tensor:
    """``x`` [M, K] (bf16, fp16 or fp32) times float8 ``weight`` [N, K] scaled by ``weight_scale``
    (float32, [N] or one element), plus ``bias`` [N]: [M, N] in ``x``'s dtype. A weight in ``x``'s
    dtype is multiplied as it is (``weight_scale`` None). ``tiles`` defaults to :func:`choose_tiles`;
    without ``tiles``, one row goes to kernels/gemv_triton.py where its card has a launch shape for it.
    ``gated``: ``x`` is [M, 2K], gate then up, and the product takes ``silu(gate) * up`` as it
    loads them (the SiLU-and-mul kernel's values: no launch of it, no [M, K] row written and read)."""
    num_rows, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n = weight.shape[0]
    assert weight.shape == (n, k) and weight.stride(1) == 1, (x.shape, weight.shape, weight.stride())
    assert weight_scale is None or weight_scale.numel() in (1, n), (weight_scale.shape, n)
    x = x if x.stride(1) == 1 else x.contiguous()
    one_row = gemv_triton.gemv_tiles(x, weight) if tiles is None and num_rows == 1 and not gated else None
    if one_row is not None:  # one row: the CUDA-core product, where it was measured faster
        return gemv_triton.one_row_gemm(x, weight, weight_scale, bias, one_row)
    scale = weight.new_empty(0, dtype=torch.float32) if weight_scale is None else weight_scale.reshape(-1).float()
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    tiles = tiles or choose_tiles(num_rows, n, k, x.dtype, num_sms(x.device), device_name(x.device), weight.dtype)
    block_m = _block_m(num_rows)
    k_per_split = triton.cdiv(triton.cdiv(k, tiles.split_k), tiles.block_k) * tiles.block_k
    is_split = tiles.split_k > 1
    partial = torch.empty((tiles.split_k, num_rows, n) if is_split else (1,), dtype=torch.float32,
                          device=x.device)
    pdl = programmatic_launch(x.device)
    flags = dict(SCALE=0 if weight_scale is None else 2 if scale.numel() == n and n > 1 else 1,
                 HAS_BIAS=bias is not None, PDL=pdl, launch_pdl=pdl)
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    grid = (triton.cdiv(n, tiles.block_n), tiles.split_k, triton.cdiv(num_rows, block_m))
    counters = _split_counters(x.device, grid[0] * grid[2]) if is_split and tiles.serial_reduce else None
    _fp8_weight_gemm_kernel[grid](
        out, partial, counters if counters is not None else partial, x, weight, scale if scale.numel() else out,
        bias_arg,
        num_rows, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, IS_SPLIT=is_split,
        SERIAL_REDUCE=counters is not None, L2_PREFETCH=tiles.l2_prefetch and x.is_cuda,
        EVEN_K=k % tiles.block_k == 0, SWAP_AB=tiles.swap_ab,
        ASM_WIDEN=tiles.asm_widen and x.is_cuda and weight.element_size() == 1, GATED=gated,
        DOT_PRECISION=dot_precision(x), DOT_IN_FP32=not x.is_cuda,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **flags)
    if is_split and counters is None:
        block = min(1024, triton.next_power_of_2(n))
        _reduce_splits_kernel[(num_rows, triton.cdiv(n, block))](
            out, partial, scale if scale.numel() else out, bias_arg, num_rows, n, out.stride(0),
            SPLIT_K=tiles.split_k, BLOCK=block, num_warps=4, **flags)
    return out


def _split_counters(device: torch.device, num_tiles: int) -> torch.Tensor | None:
    """The count of finished splits of each output tile (:func:`launch_counters`; None: the splits
    are added by a second kernel)."""
    return launch_counters(_SPLIT_COUNTERS, device, _MAX_SPLIT_TILES, num_tiles)
