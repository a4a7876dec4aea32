"""Fusions at the end of the one-row product (kernels/gemv_triton.py), which a decode step of one
token runs for its weight products: the gate/up projection ending in SiLU-and-mul, the QKV
projection ending in rotary and the KV cache's store. Each takes the row where ``linear`` would run
the one-row product, gives the bits of the kernels it replaces, and saves one launch a layer
(~2-3 us each on an H200, where a batch-1 step of an 8B model runs ~290 kernels). Elsewhere they
return None and the caller runs the unfused kernels. Triton is imported only when they run.
"""
from __future__ import annotations

import torch

from meshlm.kernels.fp8 import small_batch_kernel_wins, weight_only_kernel_runs

__all__ = ["one_row_qkv_rotary_cache", "one_row_silu_and_mul", "one_row_tiles", "set_gated_one_row",
           "set_qkv_rotary_one_row"]

# Whether a single row's gate/up projection ends in SiLU-and-mul (one_row_silu_and_mul).
# set_gated_one_row(False) turns it off (benchmarks compare).
_GATED_ONE_ROW = {"enabled": True}
# Whether a single row's QKV projection ends in rotary and the cache's store (one_row_qkv_rotary_cache).
# set_qkv_rotary_one_row(False) turns it off (benchmarks compare).
_QKV_ROTARY_ONE_ROW = {"enabled": True}


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


def one_row_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                         weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``x`` [1, K] times ``weight`` [2I, K] (gate rows, then up rows; float8
    with ``weight_scale``, or x's 16-bit dtype): [1, I], bitwise SiLU-and-mul of ``linear(x, weight,
    weight_scale)``. None where that does not run the one-row product, where the recorded shape
    splits K, or with the fusion off."""
    if not _GATED_ONE_ROW["enabled"]:
        return None
    tiles = one_row_tiles(x, weight, weight_scale)
    if tiles is None or tiles.split_k != 1 or tiles.block_n % 2 or weight.shape[0] % 2:
        return None
    from meshlm.kernels import gemv_triton
    return gemv_triton.one_row_gemm(x.contiguous(), weight, weight_scale, None, tiles, gated=True)


def one_row_qkv_rotary_cache(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                             bias: torch.Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int,
                             cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                             slot_mapping: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor | None:
    """The query heads [1, num_heads, head_dim] of ``x`` [1, K] times the QKV ``weight`` (plus
    ``bias``) rotated at ``positions[0]``, the rotated keys and the values stored in ``kv_cache`` at
    ``slot_mapping[0]``: what ``linear`` and the rotate-and-cache kernel give (TritonOps'
    rotary_and_cache with ``cos``, ``sin`` [max_positions, head_dim / 2]). None where ``linear``
    does not run the one-row product, where the kernel does not take the cache, or with the fusion off."""
    if not _QKV_ROTARY_ONE_ROW["enabled"]:
        return None
    tiles = one_row_tiles(x, weight, weight_scale)
    if tiles is None or tiles.block_n % 2:
        return None
    from meshlm.kernels import qkv_rotary_triton
    k_cache, v_cache = kv_cache
    if not qkv_rotary_triton.takes_cache(x, cos, sin, k_cache, v_cache, head_dim):
        return None
    return qkv_rotary_triton.qkv_rotary_cache(x.contiguous(), weight, weight_scale, bias, tiles, cos, sin, positions,
                                              slot_mapping, k_cache, v_cache, k_scale, v_scale, num_heads,
                                              num_kv_heads, head_dim)
