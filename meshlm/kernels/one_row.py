"""Fusions at the end of the one-row product (kernels/gemv_triton.py), which a decode step of one
token runs for its weight products: the gate/up projection ending in SiLU-and-mul, the QKV
projection ending in rotary and the KV cache's store. Each takes the row where ``linear`` would run
the one-row product, gives the bits of the kernels it replaces, and saves one launch a layer
(~2-3 us each on an H200, where a batch-1 step of an 8B model runs ~290 kernels). Elsewhere they
return None and the caller runs the unfused kernels. Triton is imported only when they run.

The RMS norm between two blocks moves into the products around it (``one_row_add_norm``): the
output and down projections end by adding the residual stream, storing the sum ``s``, ``s`` times
the next norm's weight ``g`` and the sums of ``s**2`` over their tiles (a SummedRow); the QKV and
gate/up products after them multiply ``s * g`` and scale their float32 sums by
``rsqrt(mean(s**2) + eps)``, which is the norm's product up to where it rounds (the norm kernel
rounds ``s * rstd`` and then ``g *`` that to the model dtype; here ``s * g`` is rounded once and the
rstd is applied in float32). Two launches of the norm kernel a layer fewer: on an H200 an 8B batch-1
step 3.98 -> 3.91 ms with bf16 weights, 2.56 -> 2.48 with float8 (benchmarks/RESULTS.md, twelfth
run). A product that cannot take a SummedRow runs the norm kernel on ``s`` first (``SummedRow.normed``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from meshlm.kernels.fp8 import small_batch_kernel_wins, weight_only_kernel_runs

__all__ = ["SummedRow", "one_row_add_norm", "one_row_qkv_rotary_cache", "one_row_silu_and_mul", "one_row_tiles",
           "set_gated_one_row", "set_norm_in_products", "set_qkv_rotary_one_row"]

# Whether a single row's gate/up projection ends in SiLU-and-mul (one_row_silu_and_mul).
# set_gated_one_row(False) turns it off (benchmarks compare).
_GATED_ONE_ROW = {"enabled": True}
# Whether a single row's QKV projection ends in rotary and the cache's store (one_row_qkv_rotary_cache).
# set_qkv_rotary_one_row(False) turns it off (benchmarks compare).
_QKV_ROTARY_ONE_ROW = {"enabled": True}
# Whether a single row's output and down projections add the residual and hand the next RMS norm to
# the product after it (one_row_add_norm). set_norm_in_products(False) turns it off (benchmarks compare).
_NORM_IN_PRODUCTS = {"enabled": True}


class RowNorm(Protocol):
    """An RMS norm (parallel/layers.py's RMSNorm): ``weight * rmsnorm(x)``."""
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class SummedRow:
    """A one-row product plus the residual stream, with the next RMS norm left to the product that
    reads it: ``row`` [1, K] the sum (the stream from here on), ``scaled`` [1, K] ``row`` times the
    norm's weight (both in the model dtype), ``sumsq`` float32 [tiles] the sums of ``row**2`` over
    the producing kernel's tiles of channels; ``norm`` the RMSNorm (its ``weight``, ``eps``, and
    the norm kernel for a product that does not take the row so)."""
    row: torch.Tensor
    scaled: torch.Tensor
    sumsq: torch.Tensor
    norm: RowNorm

    @property
    def shape(self) -> torch.Size:
        return self.row.shape

    def normed(self) -> torch.Tensor:
        """``norm(row)`` as the norm kernel computes it, for a product that does not take the row."""
        return self.norm(self.row)


def set_norm_in_products(enabled: bool) -> None:
    """Whether forward passes run (and CUDA graphs captured) from now on add a single row's residual
    in its output and down projections and hand the next norm to the product after them."""
    _NORM_IN_PRODUCTS["enabled"] = enabled


def set_gated_one_row(enabled: bool) -> None:
    """Whether forward passes run (and CUDA graphs captured) from now on end a single row's gate/up
    projection in SiLU-and-mul."""
    _GATED_ONE_ROW["enabled"] = enabled


def set_qkv_rotary_one_row(enabled: bool) -> None:
    """Whether forward passes run (and CUDA graphs captured) from now on end a single row's QKV
    projection in rotary and the KV cache's store."""
    _QKV_ROTARY_ONE_ROW["enabled"] = enabled


def one_row_tiles(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None):
    """The one-row product's launch shape (gemv_triton.GemvTiles) where ``linear(x, weight,
    weight_scale)`` runs that kernel: ``x`` one 16-bit row on a GPU, a float8 weight on a card with
    FP8 support or a weight of x's dtype that the small-batch kernel was measured faster for, a
    shape recorded for the card; else None."""
    if not x.is_cuda or x.dim() != 2 or x.shape[0] != 1:
        return None
    if weight_scale is None and (weight.dtype != x.dtype or not small_batch_kernel_wins(x, weight)):
        return None
    if weight_scale is not None and not weight_only_kernel_runs(x):
        return None  # a card without FP8 support: linear widens the weight in torch
    from meshlm.kernels import gemv_triton
    return gemv_triton.gemv_tiles(x, weight)


def one_row_add_norm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                     residual: torch.Tensor, norm: RowNorm) -> SummedRow | None:
    """``x`` [1, K] times ``weight`` [N, K] (as ``linear``, no bias) plus ``residual`` [1, N], with
    the RMSNorm ``norm`` after it left to the next product: a SummedRow whose ``row`` is bitwise the
    product rounded to x's dtype plus the residual (the norm kernel's sum). None where ``linear``
    does not run the one-row product, where the recorded shape splits K, for rows not in bfloat16
    (``s * g`` could overflow float16's range where the normed row does not), or with it off."""
    if not _NORM_IN_PRODUCTS["enabled"] or x.dtype != torch.bfloat16:
        return None
    tiles = one_row_tiles(x, weight, weight_scale)
    if tiles is None or tiles.split_k != 1 or residual.dtype != x.dtype or residual.shape != (1, weight.shape[0]):
        return None
    from meshlm.kernels import gemv_triton
    row, scaled, sumsq = gemv_triton.one_row_add_norm(x.contiguous(), weight, weight_scale, tiles,
                                                      residual.contiguous(), norm.weight)
    return SummedRow(row, scaled, sumsq, norm)


def one_row_silu_and_mul(x: torch.Tensor | SummedRow, weight: torch.Tensor,
                         weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``x`` [1, K] times ``weight`` [2I, K] (gate rows, then up rows; float8
    with ``weight_scale``, or x's 16-bit dtype): [1, I], bitwise SiLU-and-mul of ``linear(x, weight,
    weight_scale)`` (of its norm for a SummedRow, up to the norm's roundings). None where that does
    not run the one-row product, where the recorded shape splits K, or with the fusion off."""
    if not _GATED_ONE_ROW["enabled"]:
        return None
    row = x.scaled if isinstance(x, SummedRow) else x
    tiles = one_row_tiles(row, weight, weight_scale)
    if tiles is None or tiles.split_k != 1 or tiles.block_n % 2 or weight.shape[0] % 2:
        return None
    from meshlm.kernels import gemv_triton
    return gemv_triton.one_row_gemm(row.contiguous(), weight, weight_scale, None, tiles, gated=True,
                                    norm_in=_norm_in(x))


def _norm_in(x: torch.Tensor | SummedRow):
    """gemv_triton.NormIn of a SummedRow (its partial sums of squares and eps), or None."""
    if not isinstance(x, SummedRow):
        return None
    from meshlm.kernels.gemv_triton import NormIn
    return NormIn(x.sumsq, x.norm.eps)


def one_row_qkv_rotary_cache(x: torch.Tensor | SummedRow, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                             bias: torch.Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int,
                             cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                             slot_mapping: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The query heads [1, num_heads, head_dim] of ``x`` [1, K] times the QKV ``weight`` (plus
    ``bias``) rotated at ``positions[0]``, the rotated keys and the values stored in ``kv_cache`` at
    ``slot_mapping[0]``: what ``linear`` and the rotate-and-cache kernel give (TritonOps'
    rotary_and_cache with ``cos``, ``sin`` [max_positions, head_dim / 2]); a SummedRow's norm is
    taken in the product. None where ``linear`` does not run the one-row product, where the kernel
    does not take the cache, or with the fusion off."""
    if not _QKV_ROTARY_ONE_ROW["enabled"]:
        return None
    row = x.scaled if isinstance(x, SummedRow) else x
    tiles = one_row_tiles(row, weight, weight_scale)
    if tiles is None or tiles.block_n % 2:
        return None
    from meshlm.kernels import qkv_rotary_triton
    k_cache, v_cache = kv_cache
    if not qkv_rotary_triton.takes_cache(row, cos, sin, k_cache, v_cache, head_dim):
        return None
    return qkv_rotary_triton.qkv_rotary_cache(row.contiguous(), weight, weight_scale, bias, tiles, cos, sin,
                                              positions, slot_mapping, k_cache, v_cache, k_scale, v_scale,
                                              num_heads, num_kv_heads, head_dim, _norm_in(x))
