"""The unified attention kernel's tiles as a function of the batch's shape (no Triton needed)."""
from __future__ import annotations

import itertools

import pytest
import torch

from meshlm.kernels.attention_tiles import UnifiedTiles, check_tiles, unified_tiles

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("head_dim,group,max_query_len,dtype,expected", [
    # decode batches: one token per row group, padded to 16 rows; 128 keys a tile in 16 bits
    (128, 4, 1, BF16, UnifiedTiles(16, 128, 4, 3)),
    (128, 32, 1, BF16, UnifiedTiles(32, 128, 4, 3)),
    (128, 4, 1, FP32, UnifiedTiles(16, 32, 4, 3)),
    (256, 4, 1, BF16, UnifiedTiles(16, 64, 4, 3)),  # wide heads: half the keys
    # prefill: query tokens x group rows, a power of two, at least 16, at most 64 (fp32: 32)
    (128, 4, 3, BF16, UnifiedTiles(16, 64, 4, 3)),  # 12 rows -> 16
    (128, 4, 5, BF16, UnifiedTiles(32, 64, 4, 3)),  # 20 rows -> 32
    (128, 4, 8192, BF16, UnifiedTiles(64, 64, 4, 3)),
    (128, 3, 8192, BF16, UnifiedTiles(64, 64, 4, 3)),
    (64, 4, 8192, FP32, UnifiedTiles(32, 32, 4, 3)),
    (256, 4, 8192, BF16, UnifiedTiles(64, 32, 4, 3)),
    (128, 128, 2, BF16, UnifiedTiles(128, 64, 4, 3)),  # a group wider than the cap still fits whole
])
def test_tiles_by_shape(head_dim, group, max_query_len, dtype, expected):
    assert unified_tiles(head_dim, group, max_query_len, dtype) == expected


def test_every_chosen_tile_is_one_the_kernel_runs():
    for head_dim, group, max_query_len, dtype in itertools.product(
            (16, 64, 128, 256), (1, 2, 3, 4, 5, 8, 16, 64), (1, 2, 7, 16, 100, 32768), (BF16, torch.float16, FP32)):
        tiles = unified_tiles(head_dim, group, max_query_len, dtype)
        check_tiles(tiles, group)
        assert tiles.block_m >= group, (head_dim, group, max_query_len, dtype, tiles)


@pytest.mark.parametrize("tiles,group,text", [
    (UnifiedTiles(16, 64, 4, 3), 32, "block_m=16 must be a power of two >= 32"),
    (UnifiedTiles(48, 64, 4, 3), 4, "block_m=48 must be a power of two >= 16"),
    (UnifiedTiles(64, 8, 4, 3), 4, "block_n=8 must be a power of two >= 16"),
])
def test_tiles_the_kernel_cannot_run_are_refused(tiles, group, text):
    with pytest.raises(ValueError, match=text) as err:
        check_tiles(tiles, group)
    assert f"group of {group} heads" in str(err.value)
