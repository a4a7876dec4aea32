"""Tile sizes of the unified attention kernel (:mod:`meshlm.kernels.triton_attention`), chosen from
a batch's shape; plain Python, so that the choice is testable without Triton."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True, slots=True)
class UnifiedTiles:
    """Launch shape of the unified kernel: tile rows (query tokens x the heads of one GQA group),
    keys per tile, warps per program, pipeline depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def unified_tiles(head_dim: int, group: int, max_query_len: int, dtype: torch.dtype) -> UnifiedTiles:
    """Tiles of the unified kernel for a batch's shape; tile rows hold a whole GQA group, at least 16.

    Measured on an H100 (bf16, head_dim 128, group 4): decode batches read the cache fastest
    with 128-key tiles, mostly because a few long sequences then keep more loads in flight;
    mixed batches and prefills run best with 64 x 64 tiles (``benchmarks/attention_bench.py
    --sweep`` times the others). Heads wider than 128 take half the keys per tile, so that the
    pipelined K and V tiles stay within shared memory. fp32 (tests) takes small tiles, which
    keep its twice larger elements within shared memory and compile quickly.
    """
    group_rows = next_power_of_2(group)
    is_fp32 = dtype == torch.float32
    wide = head_dim > 128
    if max_query_len == 1:
        block_n = 32 if is_fp32 else 64 if wide else 128
        return UnifiedTiles(max(16, group_rows), block_n, 4, 3)
    max_rows = 32 if is_fp32 else 64
    block_m = max(group_rows, min(max_rows, next_power_of_2(max_query_len * group)), 16)
    return UnifiedTiles(block_m, 32 if is_fp32 or wide else 64, 4, 3)


def check_tiles(tiles: UnifiedTiles, group: int) -> None:
    """Refuse tiles the kernel cannot run: rows that do not hold a whole group, sizes that are
    not powers of two or are below the tensor cores' 16."""
    for name, value, least in (("block_m", tiles.block_m, max(16, next_power_of_2(group))),
                               ("block_n", tiles.block_n, 16)):
        if value < least or value & (value - 1):
            raise ValueError(f"{tiles}: {name}={value} must be a power of two >= {least} "
                             f"(GQA group of {group} heads, tensor-core tiles of 16)")
