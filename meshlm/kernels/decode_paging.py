"""Which (sequence, KV heads, split) a decode program takes, where its tile's keys and values live
in the paged KV cache, and an fp8 cache's scales for the tile's rows: the addressing half of the
split-KV decode kernel (:mod:`meshlm.kernels.decode_attention`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_block_ids(table_row, tile_start, key_lo, seq_len, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                 PAGED_TILE: tl.constexpr, MASKED: tl.constexpr, KV_HEADS: tl.constexpr):
    """Cache block ids of keys [tile_start, tile_start + BLOCK_N): one per tile column [KV_HEADS *
    BLOCK_N] (:func:`tile_columns`), or one per cache block [BLOCK_N // KV_BLOCK_SIZE]
    (``PAGED_TILE``). Masked: 0 for blocks no query sees."""
    if PAGED_TILE:
        index = tile_start // KV_BLOCK_SIZE + tl.arange(0, BLOCK_N // KV_BLOCK_SIZE)
        is_seen = (index * KV_BLOCK_SIZE < seq_len) & ((index + 1) * KV_BLOCK_SIZE > key_lo)
    else:
        if KV_HEADS > 1:
            key_pos, _ = tile_columns(tile_start, BLOCK_N, KV_HEADS)
        else:
            key_pos = tile_start + tl.arange(0, BLOCK_N)
        index = key_pos // KV_BLOCK_SIZE
        is_seen = (key_pos >= key_lo) & (key_pos < seq_len)
    if MASKED:
        blocks = tl.load(table_row + index, mask=is_seen, other=0)
    else:
        blocks = tl.load(table_row + index)
    return blocks.to(tl.int64)


@triton.jit
def tile_columns(tile_start, BLOCK_N: tl.constexpr, KV_HEADS: tl.constexpr):
    """The key of each of a tile's KV_HEADS * BLOCK_N columns, and its KV head among the program's:
    key-major, so that a key's heads, side by side in the cache, are neighbours."""
    columns = tl.arange(0, KV_HEADS * BLOCK_N)
    return tile_start + columns // KV_HEADS, columns % KV_HEADS


@triton.jit
def key_rows(blocks, key_pos, column_kv_head, stride_block, stride_offset, stride_head, BLOCK_N: tl.constexpr,
              KV_BLOCK_SIZE: tl.constexpr, PAGED_TILE: tl.constexpr, KV_HEADS: tl.constexpr):
    """[KV_HEADS * BLOCK_N] offset of each tile column's row (head_dim elements along memory) from
    the program's first KV head."""
    if PAGED_TILE:  # [blocks, KV_BLOCK_SIZE * KV_HEADS] -> the columns, block-major as the keys
        within = tl.arange(0, KV_BLOCK_SIZE * KV_HEADS)  # (offset, KV head) in a block
        within = (within // KV_HEADS) * stride_offset + (within % KV_HEADS) * stride_head
        rows = tl.reshape(blocks[:, None] * stride_block + within[None, :], [KV_HEADS * BLOCK_N])
    else:
        rows = blocks * stride_block + (key_pos % KV_BLOCK_SIZE) * stride_offset
        if KV_HEADS > 1:
            rows += column_kv_head * stride_head
    return rows


@triton.jit
def row_scales(scale_ptr, kv_head, row_kv_head, is_row, KV_HEADS: tl.constexpr):
    """An fp8 cache's scale for every row: one value (one KV head), or [GROUP_ROWS, 1]."""
    if KV_HEADS > 1:
        scale = tl.load(scale_ptr + kv_head + row_kv_head, mask=is_row, other=1.0)[:, None]
    else:
        scale = tl.load(scale_ptr + kv_head)
    return scale


@triton.jit
def program_ids(HEADS_FIRST: tl.constexpr, SPLITS_FIRST: tl.constexpr):
    """(sequence, KV-heads program, KV-heads programs a sequence, split) of this program. The grid
    is (sequence, KV heads, split); HEADS_FIRST swaps the first two (a block's KV heads are then
    read side by side); SPLITS_FIRST puts the split first (a pair's splits then run side by side,
    and a pair is merged as soon as its splits end, not all pairs at the end)."""
    if SPLITS_FIRST:
        split = tl.program_id(0)
        first, second = tl.program_id(1), tl.program_id(2)
        num_first, num_second = tl.num_programs(1), tl.num_programs(2)
    else:
        first, second = tl.program_id(0), tl.program_id(1)
        num_first, num_second = tl.num_programs(0), tl.num_programs(1)
        split = tl.program_id(2)
    if HEADS_FIRST:
        seq, kv_program, num_kv_programs = second, first, num_first
    else:
        seq, kv_program, num_kv_programs = first, second, num_second
    return seq, kv_program, num_kv_programs, split
