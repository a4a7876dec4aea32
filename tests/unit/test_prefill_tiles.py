"""Which batches the prefill attention kernel takes, and its launch shape (plain Python)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from meshlm.kernels.prefill_tiles import (
    PREFILL_HEAD_DIMS, PREFILL_MIN_QUERY_LEN, SM90_SHARED_BYTES, PrefillTiles, num_leading_decodes, prefill_tiles,
    tile_shared_bytes, uses_prefill_kernel)

LONG = PREFILL_MIN_QUERY_LEN


def takes(query_lens, dtype=torch.bfloat16, kv_dtype=None, head_dim=128, group=4, window=None) -> bool:
    tiles = prefill_tiles(head_dim, group, dtype)
    return uses_prefill_kernel(np.array(query_lens), dtype, kv_dtype or dtype, head_dim, group, window, tiles)


def test_long_prefills_take_the_prefill_kernel():
    assert takes([LONG])
    assert takes([8192, 8192, 8192, 8192])
    assert takes([LONG, 300, 17], dtype=torch.float32, head_dim=64)
    assert not takes([LONG - 1])
    assert not takes([LONG - 1, LONG - 1, LONG - 1])
    assert not takes([])


def test_what_the_kernel_does_not_handle_stays_on_the_unified_kernel():
    assert not takes([8192], window=4096)
    assert not takes([8192], kv_dtype=torch.float8_e4m3fn)
    for head_dim in (32, 96, 256):
        assert not takes([8192], head_dim=head_dim)


def test_decodes_mixed_in_leave_at_most_a_quarter_of_the_rows_empty():
    block_q = prefill_tiles(128, 4, torch.bfloat16).query_tokens(4)
    tokens = 4096
    allowed = tokens // 4 // (block_q - 1)  # decodes whose empty rows fit in a quarter of the batch
    assert takes([tokens] + [1] * allowed)
    assert not takes([tokens] + [1] * (allowed + 8))


def test_tiles_hold_a_group():
    for group in (1, 4, 8, 32, 64):
        tiles = prefill_tiles(128, group, torch.bfloat16)
        tiles.check(group)
        assert tiles.query_tokens(group) >= 1
    packed = PrefillTiles(128, 64, 8, 3, pack_gqa=True)
    assert packed.query_tokens(4) * 4 == 128 and PrefillTiles(128, 64, 8, 3, pack_gqa=False).query_tokens(4) == 128


# sm_90's limit a program, an A100's (163 KiB) and a card of 99 KiB (sm_86, sm_89), less the margin.
@pytest.mark.parametrize("shared_bytes", [SM90_SHARED_BYTES, 166912 - 1024, 101376 - 1024])
@pytest.mark.parametrize("head_dim", PREFILL_HEAD_DIMS)
def test_keys_halve_until_the_tiles_fit_the_cards_shared_memory(head_dim, shared_bytes):
    widest = prefill_tiles(head_dim, 4, torch.bfloat16, shared_bytes=1 << 30)
    tiles = prefill_tiles(head_dim, 4, torch.bfloat16, shared_bytes=shared_bytes)
    assert tile_shared_bytes(tiles, head_dim, 2) <= shared_bytes
    assert tiles.block_n == widest.block_n or tile_shared_bytes(replace(tiles, block_n=2 * tiles.block_n),
                                                                head_dim, 2) > shared_bytes
    assert (tiles.block_m, tiles.num_stages) == (widest.block_m, widest.num_stages)


def test_the_default_takes_128_keys_on_sm90_and_64_on_an_a100():
    """The tile that the H200 sweep chose (224 KiB of K/V stages and Q) and what a smaller card gets."""
    assert prefill_tiles(128, 4, torch.bfloat16).block_n == 128
    assert tile_shared_bytes(prefill_tiles(128, 4, torch.bfloat16), 128, 2) == 224 * 1024
    assert prefill_tiles(128, 4, torch.bfloat16, shared_bytes=166912 - 1024).block_n == 64
    assert prefill_tiles(256, 4, torch.bfloat16).block_n == 32


@pytest.mark.parametrize("tiles,group", [(PrefillTiles(96, 64, 8, 3), 4), (PrefillTiles(128, 8, 8, 3), 4),
                                         (PrefillTiles(16, 64, 4, 2), 32)])
def test_tiles_the_kernel_cannot_run_are_refused(tiles, group):
    with pytest.raises(ValueError, match="block_"):
        tiles.check(group)


def test_leading_decodes_are_counted_only_in_the_schedulers_order():
    assert num_leading_decodes(np.array([1, 1, 1, 2048, 700])) == 3
    assert num_leading_decodes(np.array([2048, 700])) == 0
    assert num_leading_decodes(np.array([1, 2048, 1])) == 0  # a decode after a chunk: one kernel for all
    assert num_leading_decodes(np.array([1, 1])) == 2


def test_descriptor_loads_need_the_step_keys_read_apart():
    with pytest.raises(ValueError, match="tma_kv"):
        PrefillTiles(128, 64, 8, 3, tma_kv=True).check(4)
    PrefillTiles(128, 64, 8, 3, contiguous_kv=True, tma_kv=True).check(4)
