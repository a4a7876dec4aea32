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


# 16-bit tiles for heads up to 128 wide, by the batch's kind: (most rows, keys a tile, warps,
# stages). Rows are query tokens x the heads of a GQA group, cut to what the batch fills.
# ``benchmarks/attention_bench.py --sweep`` prints the fastest per shape: decode shapes set
# _DECODE's keys, warps and stages, the prefill shapes (1x2k and longer) _LONG_PREFILL.
_DECODE = (16, 128, 4, 3)
_MIXED = (64, 64, 4, 3)
_LONG_PREFILL = (64, 64, 4, 3)
# Query tokens from which a batch runs the long-prefill tiles.
_LONG_PREFILL_TOKENS = 1024


def unified_tiles(head_dim: int, group: int, max_query_len: int, dtype: torch.dtype) -> UnifiedTiles:
    """Tiles of the unified kernel for a batch's shape; tile rows hold a whole GQA group, at least 16.

    Measured on an H100 (bf16, head_dim 128, group 4): decode batches read the cache fastest
    with 128-key tiles, mostly because a few long sequences then keep more loads in flight;
    mixed batches run best with 64 x 64 tiles, and prefills take the same until a sweep on the
    card says otherwise. Heads wider than 128 take half the keys per tile, so that the pipelined
    K and V tiles stay within shared memory. fp32 (tests) takes small tiles, which keep its
    twice larger elements within shared memory and compile quickly.
    """
    group_rows = next_power_of_2(group)
    if dtype == torch.float32:
        max_rows, block_n, num_warps, num_stages = (16, 32, 4, 3) if max_query_len == 1 else (32, 32, 4, 3)
    elif max_query_len == 1:
        max_rows, block_n, num_warps, num_stages = _DECODE
    else:
        max_rows, block_n, num_warps, num_stages = (
            _LONG_PREFILL if max_query_len >= _LONG_PREFILL_TOKENS else _MIXED)
    if head_dim > 128 and dtype != torch.float32:
        block_n //= 2
    rows = 1 if max_query_len == 1 else next_power_of_2(max_query_len * group)
    block_m = max(group_rows, min(max_rows, rows), 16)
    return UnifiedTiles(block_m, block_n, num_warps, num_stages)


def check_tiles(tiles: UnifiedTiles, group: int) -> None:
    """Refuse tiles the kernel cannot run: rows that do not hold a whole group, sizes that are
    not powers of two or are below the tensor cores' 16."""
    for name, value, least in (("block_m", tiles.block_m, max(16, next_power_of_2(group))),
                               ("block_n", tiles.block_n, 16)):
        if value < least or value & (value - 1):
            raise ValueError(f"{tiles}: {name}={value} must be a power of two >= {least} "
                             f"(GQA group of {group} heads, tensor-core tiles of 16)")
