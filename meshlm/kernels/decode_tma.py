"""The split-KV decode kernel reading the paged cache by tensor-descriptor (TMA) loads: one bulk copy
per cache block of keys and one of values, instead of a pointer load per element.

A 16-bit cache [num_blocks, block_size, num_kv_heads, head_dim] is seen as rows [num_blocks *
block_size, num_kv_heads * head_dim]; a cache block of ``KV_HEADS`` neighbouring heads is then one
box [block_size, KV_HEADS * head_dim] at row ``block_id * block_size``, column ``kv_head *
head_dim``. The query rows of the program's GQA groups are laid out as wide as the box ("wide
rows"): row r of KV head h holds its query in columns [h * head_dim, (h + 1) * head_dim) and zeros
elsewhere, so ``q_wide @ k_box^T`` gives each row its own head's scores with no mask and no
reshaping of the box. The product with the values gives each row its head's output in its own
columns (the other head's columns hold a sum the store leaves out). A tile is ``block_n`` keys:
one or two cache blocks, each its own pair of products sharing the tile's running maximum.

Grid, splits, partial outputs and their merge as :mod:`meshlm.kernels.decode_attention` (the
same ``merge_splits``); ``DecodeTiles.tma_kv`` picks this kernel. 16-bit pools only, no sliding
window, boxes at most 256 elements wide (``tma_decode_fits``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from meshlm.kernels.decode_paging import program_ids
from meshlm.kernels.triton_launch import dot_precision, programmatic_launch
from meshlm.kernels.triton_pdl import wait_for_previous_kernel

# TMA's limit on a box's extent along each dimension, in elements.
MAX_BOX_ELEMENTS = 256


@triton.jit(do_not_specialize=["num_splits", "stride_table_seq"])
def _decode_tma_kernel(
        out_ptr, partial_ptr, lse_ptr, q_ptr, k_desc, v_desc, block_tables_ptr, seq_lens_ptr, num_splits,
        qk_scale_log2, stride_q_token, stride_q_head, stride_o_token, stride_o_head, stride_table_seq,
        GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, KV_HEADS: tl.constexpr, IS_SPLIT: tl.constexpr, HEADS_FIRST: tl.constexpr,
        AHEAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    seq, kv_program, num_kv_programs, split = program_ids(HEADS_FIRST, False)
    kv_head = kv_program * KV_HEADS
    seq_len = tl.load(seq_lens_ptr + seq)
    split_keys = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    split_start = split * split_keys
    split_end = tl.minimum(split_start + split_keys, seq_len)

    rows = tl.arange(0, GROUP_ROWS)
    columns = tl.arange(0, KV_HEADS * HEAD_DIM)
    is_row = rows < KV_HEADS * GROUP
    head = kv_head * GROUP + rows  # [GROUP_ROWS]
    own = is_row[:, None] & (columns[None, :] // HEAD_DIM == (rows // GROUP)[:, None])  # a row's own columns
    dims = (columns % HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_token + head[:, None] * stride_q_head + dims, mask=own,
                other=0.0)  # [GROUP_ROWS, KV_HEADS * HEAD_DIM], wide rows
    m_i = tl.full([GROUP_ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    acc = tl.zeros([GROUP_ROWS, KV_HEADS * HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    column = kv_head * HEAD_DIM
    full_end = tl.maximum(tl.minimum(split_end, seq_len // BLOCK_N * BLOCK_N), split_start)
    ahead = _tile_blocks(table_row, split_start, seq_len, BLOCK_N, KV_BLOCK_SIZE)
    if AHEAD == 2:  # [blocks a tile, 2]: the ids of this tile and the next
        ahead = tl.join(ahead, _tile_blocks(table_row, split_start + BLOCK_N, seq_len, BLOCK_N, KV_BLOCK_SIZE))
    acc, l_i, m_i, ahead = _walk_tiles(acc, l_i, m_i, ahead, q, k_desc, v_desc, table_row, column, split_start,
                                       full_end, seq_len, qk_scale_log2, BLOCK_N, KV_BLOCK_SIZE, AHEAD,
                                       DOT_PRECISION, DOT_IN_FP32, False)
    acc, l_i, m_i, ahead = _walk_tiles(acc, l_i, m_i, ahead, q, k_desc, v_desc, table_row, column, full_end,
                                       split_end, seq_len, qk_scale_log2, BLOCK_N, KV_BLOCK_SIZE, AHEAD,
                                       DOT_PRECISION, DOT_IN_FP32, True)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # an empty split leaves zeros
    if IS_SPLIT:
        num_heads = num_kv_programs * KV_HEADS * GROUP
        part = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [GROUP_ROWS]
        tl.store(partial_ptr + part[:, None] * HEAD_DIM + dims, acc, mask=own)
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=is_row)
    else:
        o_offsets = seq.to(tl.int64) * stride_o_token + head[:, None] * stride_o_head + dims
        tl.store(out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=own)


@triton.jit
def _tile_blocks(table_row, tile_start, seq_len, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr):
    """The cache block ids of the tile at ``tile_start`` [BLOCK_N // KV_BLOCK_SIZE] (block 0 for a
    block past the sequence: its keys are masked, its values zeroed)."""
    index = tile_start // KV_BLOCK_SIZE + tl.arange(0, BLOCK_N // KV_BLOCK_SIZE)
    return tl.load(table_row + index, mask=index * KV_BLOCK_SIZE < seq_len, other=0)


@triton.jit
def _walk_tiles(acc, l_i, m_i, ahead, q, k_desc, v_desc, table_row, column, start, end, seq_len, qk_scale_log2,
                BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, AHEAD: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax over the tiles in [start, end); ``ahead`` holds the block ids of the
    ``AHEAD`` tiles from ``start`` on (2: joined along a last axis) and comes back holding those
    from ``end`` on: each tile loads the ids of the tile ``AHEAD`` further, so that its bulk copies
    never wait for a table load issued just before them."""
    for tile_start in range(start, end, BLOCK_N):
        further = _tile_blocks(table_row, tile_start + AHEAD * BLOCK_N, seq_len, BLOCK_N, KV_BLOCK_SIZE)
        if AHEAD == 2:
            blocks, next_blocks = tl.split(ahead)
            ahead = tl.join(next_blocks, further)
        else:
            blocks = ahead
            ahead = further
        if BLOCK_N == KV_BLOCK_SIZE:
            s = _block_scores(q, k_desc, tl.sum(blocks, 0), column, tile_start, seq_len, qk_scale_log2, KV_BLOCK_SIZE,
                              DOT_PRECISION, DOT_IN_FP32, MASKED)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _block_values(p, v_desc, tl.sum(blocks, 0), column, tile_start, seq_len,
                                                       KV_BLOCK_SIZE, DOT_PRECISION, DOT_IN_FP32, MASKED)
        else:  # two cache blocks: two pairs of products against one running maximum
            first, second = tl.split(tl.reshape(blocks, [1, 2]))
            first = tl.sum(first, 0)
            second = tl.sum(second, 0)
            s_a = _block_scores(q, k_desc, first, column, tile_start, seq_len, qk_scale_log2, KV_BLOCK_SIZE,
                                DOT_PRECISION, DOT_IN_FP32, MASKED)
            s_b = _block_scores(q, k_desc, second, column, tile_start + KV_BLOCK_SIZE, seq_len, qk_scale_log2,
                                KV_BLOCK_SIZE, DOT_PRECISION, DOT_IN_FP32, MASKED)
            m_new = tl.maximum(m_i, tl.maximum(tl.max(s_a, 1), tl.max(s_b, 1)))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p_a = tl.math.exp2(s_a - m_shift[:, None])
            p_b = tl.math.exp2(s_b - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p_a, 1) + tl.sum(p_b, 1)
            acc = acc * alpha[:, None] + _block_values(p_a, v_desc, first, column, tile_start, seq_len,
                                                       KV_BLOCK_SIZE, DOT_PRECISION, DOT_IN_FP32, MASKED)
            acc += _block_values(p_b, v_desc, second, column, tile_start + KV_BLOCK_SIZE, seq_len, KV_BLOCK_SIZE,
                                 DOT_PRECISION, DOT_IN_FP32, MASKED)
        m_i = m_new
    return acc, l_i, m_i, ahead


@triton.jit
def _block_scores(q, k_desc, block, column, key_start, seq_len, qk_scale_log2, KV_BLOCK_SIZE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, MASKED: tl.constexpr):
    """Scores (log2 units) [GROUP_ROWS, KV_BLOCK_SIZE] of the wide query rows against the keys of
    cache block ``block`` (keys from ``key_start``), -inf past the sequence (``MASKED``)."""
    k = k_desc.load([(block * KV_BLOCK_SIZE).to(tl.int32), column])  # [KV_BLOCK_SIZE, KV_HEADS * HEAD_DIM]
    if DOT_IN_FP32:  # the CPU interpreter multiplies bf16 bit patterns as integers
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    if MASKED:
        s = tl.where((key_start + tl.arange(0, KV_BLOCK_SIZE) < seq_len)[None, :], s, float("-inf"))
    return s


@triton.jit
def _block_values(p, v_desc, block, column, key_start, seq_len, KV_BLOCK_SIZE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, MASKED: tl.constexpr):
    """p [GROUP_ROWS, KV_BLOCK_SIZE] times the values of cache block ``block``; values past the
    sequence (``MASKED``) are zeroed, so that whatever the pool holds there adds nothing."""
    v = v_desc.load([(block * KV_BLOCK_SIZE).to(tl.int32), column])  # [KV_BLOCK_SIZE, KV_HEADS * HEAD_DIM]
    if MASKED:
        v = tl.where((key_start + tl.arange(0, KV_BLOCK_SIZE) < seq_len)[:, None], v, 0.0)
    p = p.to(v.dtype)
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    return tl.dot(p, v, input_precision=DOT_PRECISION)


def tma_decode_fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_heads: int, block_n: int,
                    sliding_window: int | None) -> bool:
    """Whether the descriptor kernel runs this batch: a 16-bit pool in q's dtype, no window, a box
    of at most ``MAX_BOX_ELEMENTS`` columns and keys, one or two cache blocks a tile, and each
    cache's blocks laid out as rows [block_size * num_kv_heads * head_dim] of 16-byte aligned starts."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if (sliding_window is not None or k_cache.dtype != q.dtype or q.dtype not in (torch.bfloat16, torch.float16)
            or kv_heads * head_dim > MAX_BOX_ELEMENTS or block_size > MAX_BOX_ELEMENTS
            or block_n not in (block_size, 2 * block_size)):
        return False
    return all(_rows_view(cache) is not None for cache in (k_cache, v_cache))


def _rows_view(cache: torch.Tensor) -> torch.Tensor | None:
    """The cache as rows [num_blocks * block_size, num_kv_heads * head_dim], or None where its
    strides do not allow it or TMA cannot address it (16-byte aligned start and row stride)."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    row_stride = cache.stride(1)
    if (cache.stride(3) != 1 or cache.stride(2) != head_dim or row_stride < num_kv_heads * head_dim
            or cache.stride(0) != block_size * row_stride or cache.data_ptr() % 16
            or (row_stride * cache.element_size()) % 16):
        return None
    return cache.as_strided((num_blocks * block_size, num_kv_heads * head_dim), (row_stride, 1))


def launch_tma_decode(out: torch.Tensor, partial: torch.Tensor, lse: torch.Tensor, q: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale_log2: float, tiles,
                      num_splits: int) -> None:
    """Launch the descriptor kernel (``tiles``: a :class:`meshlm.kernels.decode_tiles.DecodeTiles`
    that ``tma_decode_fits``); out, or partial and lse when ``num_splits`` > 1, as the pointer kernel's."""
    num_seqs, num_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, _ = k_cache.shape
    kv_heads = tiles.kv_heads_per_program
    group = num_heads // num_kv_heads
    box = [kv_block_size, kv_heads * head_dim]
    k_rows, v_rows = _rows_view(k_cache), _rows_view(v_cache)
    k_desc = TensorDescriptor(k_rows, list(k_rows.shape), list(k_rows.stride()), box)
    v_desc = TensorDescriptor(v_rows, list(v_rows.shape), list(v_rows.stride()), box)
    num_programs = num_kv_heads // kv_heads
    grid = (num_programs, num_seqs) if tiles.heads_first else (num_seqs, num_programs)
    options = {"maxnreg": tiles.max_registers} if tiles.max_registers is not None and q.is_cuda else {}
    pdl = programmatic_launch(q.device)
    _decode_tma_kernel[(*grid, num_splits)](
        out, partial, lse, q, k_desc, v_desc, meta.block_tables, meta.seq_lens, num_splits, scale_log2,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
        GROUP=group, GROUP_ROWS=max(tiles.min_group_rows, triton.next_power_of_2(group * kv_heads)),
        BLOCK_N=tiles.block_n, KV_BLOCK_SIZE=kv_block_size, HEAD_DIM=head_dim, KV_HEADS=kv_heads,
        IS_SPLIT=num_splits > 1, HEADS_FIRST=tiles.heads_first, AHEAD=2 if tiles.prefetch_table == 2 else 1,
        DOT_PRECISION=dot_precision(q),
        DOT_IN_FP32=not q.is_cuda, PDL=pdl, launch_pdl=pdl, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **options)
