"""Paged attention for decode steps (one query token per sequence), split over the context.

Grid: (sequence, KV head, split), the first two swapped or the split first by switches. One
program loads the query rows of every head of its KV head's GQA group as one small matrix
(``GROUP_ROWS`` rows, padded to at least 16 for the tensor cores) and attends them together to
each KV tile, so a group's KV is read once. The program covers one split of its sequence's
context, ``BLOCK_N`` keys at a time through the block table, with an online softmax in fp32.

Split-KV ("flash decoding"): when sequences x KV heads are too few to fill the GPU, each
sequence's keys are cut into ``num_splits`` equal runs of whole tiles, computed from the
sequence's own length on the device; each split writes its normalised partial output and the
log-sum-exp of its scores, and a second kernel merges the splits. A split that falls past its
sequence's end writes an empty partial (log-sum-exp -inf) that the merge ignores. Or
(``DecodeTiles.fused_merge``) the last split of each (sequence, KV heads) pair to finish merges
the pair's splits in the same launch (:mod:`meshlm.kernels.split_merge`); the splits past the
sequence's keys then end at once, and a sequence whose keys fit one split writes its output itself.

``num_splits`` comes from host values that stay fixed for a decode CUDA graph (the batch size,
the KV heads, ``meta.max_seq_len``, which the graphs set to the model's length, and the SM
count), never from the step's sequence lengths, so a captured graph stays right when the
lengths change between replays.

The kernel's switches (:class:`meshlm.kernels.decode_tiles.DecodeTiles`, picked per batch shape by
``decode_tiles``) change how the cache is read and the splits merged, not the result beyond
rounding; ``tma_kv`` reads it by bulk copies instead (:mod:`meshlm.kernels.decode_tma`).

Semantics: :func:`meshlm.kernels.attention.paged_attention_reference` for query length 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshlm.kernels.attention import AttentionMetadata
from meshlm.kernels.decode_paging import key_rows, program_ids, row_scales, tile_block_ids, tile_columns
from meshlm.kernels.decode_tiles import DecodeTiles, choose_num_splits, decode_tiles
from meshlm.kernels.decode_tma import launch_tma_decode, tma_decode_fits
from meshlm.kernels.fp8_convert_triton import F16_WIDEN_FACTOR, quantize_rows_e4m3, widen_fp8
from meshlm.kernels.triton_launch import dot_precision, num_sms, programmatic_launch
from meshlm.kernels.triton_pdl import wait_for_previous_kernel
from meshlm.kernels.kv_quant import fp8_kv_as_f16, is_fp8_kv, kernel_scales
from meshlm.kernels.split_merge import merge_chunk, merge_if_last, merge_splits, split_counters

_LOG2_E = 1.4426950408889634


@triton.jit(do_not_specialize=["num_splits", "sliding_window", "stride_table_seq"])
def _decode_split_kernel(
        out_ptr, partial_ptr, lse_ptr, counter_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
        block_tables_ptr, seq_lens_ptr, num_splits, qk_scale_log2, sliding_window,
        stride_q_token, stride_q_head, stride_o_token, stride_o_head,
        stride_k_block, stride_k_offset, stride_k_head,
        stride_v_block, stride_v_offset, stride_v_head,
        stride_table_seq,
        GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
        KV_BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, IS_SPLIT: tl.constexpr,
        USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        KV_FP8: tl.constexpr, KV_FP8_AS_F16: tl.constexpr, PREFETCH_TABLE: tl.constexpr,
        K_TRANSPOSED: tl.constexpr, PAGED_TILE: tl.constexpr, HEADS_FIRST: tl.constexpr,
        KV_HEADS: tl.constexpr, SPLITS_FIRST: tl.constexpr, FUSED_MERGE: tl.constexpr, MERGE_ROWS: tl.constexpr,
        MERGE_CHUNK: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, SWAP_AB: tl.constexpr, WIDEN_K: tl.constexpr,
        WIDEN_V: tl.constexpr, FP8_QK: tl.constexpr, SUM_AT_END: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    # A program attends KV_HEADS KV heads from kv_head on (its "pair": the sequence and those heads).
    seq, kv_program, num_kv_programs, split = program_ids(HEADS_FIRST, SPLITS_FIRST)
    kv_head = kv_program * KV_HEADS
    num_kv_heads = num_kv_programs * KV_HEADS
    seq_len = tl.load(seq_lens_ptr + seq)
    key_lo = 0  # first key the query sees
    if USE_WINDOW:
        key_lo = tl.maximum(seq_len - sliding_window, 0)
    first_tile = key_lo // BLOCK_N * BLOCK_N
    # Whole tiles per split, at least MIN_SPLIT_TILES, from this sequence's length: splits share
    # its keys evenly, and a short sequence takes fewer (the later ones hold no key).
    split_keys = tl.cdiv(tl.cdiv(seq_len - first_tile, num_splits), BLOCK_N) * BLOCK_N
    split_keys = tl.maximum(split_keys, MIN_SPLIT_TILES * BLOCK_N)
    num_active = 1  # splits that write a partial output (FUSED_MERGE: those that hold keys, and the first)
    if IS_SPLIT:
        num_active = num_splits
    if FUSED_MERGE:  # a split past the sequence's keys stores nothing and is not merged
        num_active = tl.maximum(tl.cdiv(seq_len - first_tile, split_keys), 1)
        if split >= num_active:
            return
    split_start = first_tile + split * split_keys
    split_end = tl.minimum(split_start + split_keys, seq_len)

    rows = tl.arange(0, GROUP_ROWS)
    dims = tl.arange(0, HEAD_DIM)
    is_row = rows < KV_HEADS * GROUP
    head = kv_head * GROUP + rows  # [GROUP_ROWS]
    row_kv_head = rows // GROUP  # [GROUP_ROWS], among the program's KV heads
    q_offsets = seq.to(tl.int64) * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=is_row[:, None], other=0.0)  # [GROUP_ROWS, HEAD_DIM]
    if KV_FP8_AS_F16:  # float8 converts to fp16 in one instruction per pair, to bf16 in several
        q = q.to(tl.float16)
    if KV_FP8:  # keys are stored / k_scale: the head's scale multiplies the scores instead
        qk_scale_log2 = qk_scale_log2 * row_scales(k_scale_ptr, kv_head, row_kv_head, is_row, KV_HEADS)

    m_i = tl.full([GROUP_ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_ROWS], dtype=tl.float32)
    acc = tl.zeros([GROUP_ROWS, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    k_head = k_cache_ptr + kv_head * stride_k_head
    v_head = v_cache_ptr + kv_head * stride_v_head
    # Tiles below full_end lie wholly inside [key_lo, seq_len) and load without masks.
    full_end = split_start
    if not USE_WINDOW:
        full_end = tl.maximum(tl.minimum(split_end, seq_len // BLOCK_N * BLOCK_N), split_start)
    # PREFETCH_TABLE > 0: the block ids of the first tile(s) (:func:`_walk_tiles`); each tile then
    # loads those of the tile PREFETCH_TABLE ahead, so that its K and V loads never wait for them.
    ahead = tl.zeros([1], dtype=tl.int64)  # (unused without prefetches)
    if PREFETCH_TABLE == 1:
        ahead = tile_block_ids(table_row, split_start, key_lo, seq_len, BLOCK_N, KV_BLOCK_SIZE, PAGED_TILE, True,
                             KV_HEADS)
    if PREFETCH_TABLE == 2:
        ahead = tl.join(tile_block_ids(table_row, split_start, key_lo, seq_len, BLOCK_N, KV_BLOCK_SIZE, PAGED_TILE,
                                     True, KV_HEADS),
                        tile_block_ids(table_row, split_start + BLOCK_N, key_lo, seq_len, BLOCK_N, KV_BLOCK_SIZE,
                                     PAGED_TILE, True, KV_HEADS))
    acc, l_i, m_i, ahead = _walk_tiles(
        acc, l_i, m_i, ahead, q, k_head, v_head, table_row, split_start, full_end, key_lo, seq_len,
        dims, row_kv_head, qk_scale_log2, stride_k_block, stride_k_offset, stride_k_head, stride_v_block,
        stride_v_offset, stride_v_head, BLOCK_N, KV_BLOCK_SIZE, DOT_PRECISION, DOT_IN_FP32, False, KV_FP8,
        K_TRANSPOSED, PAGED_TILE, PREFETCH_TABLE, KV_HEADS, SWAP_AB, WIDEN_K, WIDEN_V, FP8_QK, SUM_AT_END)
    acc, l_i, m_i, ahead = _walk_tiles(
        acc, l_i, m_i, ahead, q, k_head, v_head, table_row, full_end, split_end, key_lo, seq_len,
        dims, row_kv_head, qk_scale_log2, stride_k_block, stride_k_offset, stride_k_head, stride_v_block,
        stride_v_offset, stride_v_head, BLOCK_N, KV_BLOCK_SIZE, DOT_PRECISION, DOT_IN_FP32, True, KV_FP8,
        K_TRANSPOSED, PAGED_TILE, PREFETCH_TABLE, KV_HEADS, SWAP_AB, WIDEN_K, WIDEN_V, FP8_QK, SUM_AT_END)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # an empty split leaves zeros
    if KV_FP8:  # values are stored / v_scale: each split's weighted sum is scaled back (the merge is linear)
        acc = acc * row_scales(v_scale_ptr, kv_head, row_kv_head, is_row, KV_HEADS)
    o_offsets = seq.to(tl.int64) * stride_o_token + head[:, None] * stride_o_head + dims[None, :]
    if num_active > 1:
        num_heads = num_kv_heads * GROUP
        part = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [GROUP_ROWS]
        tl.store(partial_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=is_row[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + part, lse, mask=is_row)
        if FUSED_MERGE:
            merge_if_last(out_ptr, partial_ptr, lse_ptr, counter_ptr, seq * num_kv_programs + kv_program, seq,
                          kv_head * GROUP, num_heads, num_splits, num_active, stride_o_token, stride_o_head,
                          KV_HEADS * GROUP, MERGE_ROWS, HEAD_DIM, MERGE_CHUNK)
    else:  # one split, or the only one of this sequence that holds keys (FUSED_MERGE): the output
        tl.store(out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


@triton.jit
def _walk_tiles(acc, l_i, m_i, ahead, q, k_head, v_head, table_row, start, end, key_lo, seq_len,
                dims, row_kv_head, qk_scale_log2, stride_k_block, stride_k_offset, stride_k_head, stride_v_block,
                stride_v_offset, stride_v_head, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, MASKED: tl.constexpr, KV_FP8: tl.constexpr,
                K_TRANSPOSED: tl.constexpr, PAGED_TILE: tl.constexpr, PREFETCH_TABLE: tl.constexpr,
                KV_HEADS: tl.constexpr, SWAP_AB: tl.constexpr, WIDEN_K: tl.constexpr, WIDEN_V: tl.constexpr,
                FP8_QK: tl.constexpr, SUM_AT_END: tl.constexpr):
    """The online softmax over the tiles in [start, end). ``ahead`` holds the block ids of the next
    PREFETCH_TABLE tiles (of ``start`` on; 2: joined as [ids, 2]) and comes back holding those of
    the tiles from ``end`` on. Every value the loop carries is computed in it: Triton does not
    pipeline a loop that passes a carried value on unchanged. ``SWAP_AB``: the loop runs on q^T,
    acc^T and the scale as a row [1, GROUP_ROWS] (:func:`_decode_tile`). ``FP8_QK``: q is
    quantized to float8 e4m3 with a scale per row, which joins the scores' scale. ``SUM_AT_END``:
    the loop carries the rows' sum per tile column (:func:`_spread_sum`), added up after the last tile."""
    if FP8_QK and KV_FP8:
        q, q_scale = quantize_rows_e4m3(q, DOT_IN_FP32)
        qk_scale_log2 = qk_scale_log2 * q_scale  # [GROUP_ROWS, 1]
    if SWAP_AB:
        q = tl.trans(q)  # [HEAD_DIM, GROUP_ROWS]
        acc = tl.trans(acc)  # [HEAD_DIM, GROUP_ROWS]
        qk_scale_log2 = tl.trans(qk_scale_log2 + tl.zeros([q.shape[1], 1], dtype=tl.float32))  # [1, GROUP_ROWS]
    if SUM_AT_END:
        l_i = _spread_sum(l_i, KV_HEADS * BLOCK_N, SWAP_AB)
    for tile_start in range(start, end, BLOCK_N):
        if PREFETCH_TABLE == 2:
            tile_blocks, next_blocks = tl.split(ahead)
            ahead = tl.join(next_blocks, tile_block_ids(table_row, tile_start + 2 * BLOCK_N, key_lo, seq_len, BLOCK_N,
                                                      KV_BLOCK_SIZE, PAGED_TILE, True, KV_HEADS))
        elif PREFETCH_TABLE == 1:
            tile_blocks = ahead
            ahead = tile_block_ids(table_row, tile_start + BLOCK_N, key_lo, seq_len, BLOCK_N, KV_BLOCK_SIZE,
                                 PAGED_TILE, True, KV_HEADS)
        else:
            tile_blocks = tile_block_ids(table_row, tile_start, key_lo, seq_len, BLOCK_N, KV_BLOCK_SIZE, PAGED_TILE,
                                       MASKED, KV_HEADS)
        acc, l_i, m_i = _decode_tile(
            acc, l_i, m_i, q, k_head, v_head, tile_blocks, tile_start, key_lo, seq_len, dims, row_kv_head,
            qk_scale_log2, stride_k_block, stride_k_offset, stride_k_head, stride_v_block, stride_v_offset,
            stride_v_head, BLOCK_N, KV_BLOCK_SIZE, DOT_PRECISION, DOT_IN_FP32, MASKED, KV_FP8, K_TRANSPOSED,
            PAGED_TILE, KV_HEADS, SWAP_AB, WIDEN_K, WIDEN_V, FP8_QK, SUM_AT_END)
    if SUM_AT_END:  # [GROUP_ROWS]
        l_i = tl.sum(l_i, 0 if SWAP_AB else 1)
    if SWAP_AB:
        acc = tl.trans(acc)  # [GROUP_ROWS, HEAD_DIM]
    return acc, l_i, m_i, ahead


@triton.jit
def _spread_sum(l_i, NUM_COLUMNS: tl.constexpr, SWAP_AB: tl.constexpr):
    """The rows' sum so far [GROUP_ROWS] -> one sum per (tile column, row) that the tiles add
    their own columns' probabilities to, the rows' sum in column 0: a tile then sums no
    probabilities across its keys, which lie in every warp (a reduction through shared memory,
    with barriers, each tile). [NUM_COLUMNS, GROUP_ROWS], or transposed without ``SWAP_AB``."""
    columns = tl.arange(0, NUM_COLUMNS)
    if SWAP_AB:
        spread = tl.where(columns[:, None] == 0, l_i[None, :], 0.0)
    else:
        spread = tl.where(columns[None, :] == 0, l_i[:, None], 0.0)
    return spread


@triton.jit
def _decode_tile(acc, l_i, m_i, q, k_head, v_head, blocks, tile_start, key_lo, seq_len, dims, row_kv_head,
                 qk_scale_log2, stride_k_block, stride_k_offset, stride_k_head, stride_v_block, stride_v_offset,
                 stride_v_head, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr, MASKED: tl.constexpr, KV_FP8: tl.constexpr,
                 K_TRANSPOSED: tl.constexpr, PAGED_TILE: tl.constexpr, KV_HEADS: tl.constexpr,
                 SWAP_AB: tl.constexpr, WIDEN_K: tl.constexpr, WIDEN_V: tl.constexpr, FP8_QK: tl.constexpr,
                 SUM_AT_END: tl.constexpr):
    """One online-softmax step of the rows over keys [tile_start, tile_start + BLOCK_N), whose
    cache blocks are ``blocks`` (:func:`tile_block_ids`). With KV_HEADS > 1 the tile holds each key
    of every KV head of the program (:func:`tile_columns`) and a row sees its own head's only.
    ``KV_FP8``: k and v are float8, widened to q's dtype (:func:`meshlm.kernels.fp8_convert_triton.widen_fp8`;
    the caller applies their scales, this tile the factor that bit moves leave). ``SWAP_AB``: q,
    acc and qk_scale_log2 come transposed ([HEAD_DIM, GROUP_ROWS], [1, GROUP_ROWS]) and the
    products run with the tile first, scores^T = K q^T and acc^T += V^T p^T. ``FP8_QK``: q is
    float8 (:func:`meshlm.kernels.fp8_convert_triton.quantize_rows_e4m3`) and the keys multiply it
    as stored, on float8 tensor cores. ``WIDEN_K`` (``WIDEN_V``) 3 or 4: keys (values) load as int32 words."""
    if KV_HEADS > 1:
        key_pos, column_kv_head = tile_columns(tile_start, BLOCK_N, KV_HEADS)  # [KV_HEADS * BLOCK_N]
    else:
        key_pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        column_kv_head = 0
    is_key = (key_pos >= key_lo) & (key_pos < seq_len)
    k_rows = key_rows(blocks, key_pos, column_kv_head, stride_k_block, stride_k_offset, stride_k_head, BLOCK_N,
                       KV_BLOCK_SIZE, PAGED_TILE, KV_HEADS)
    v_rows = key_rows(blocks, key_pos, column_kv_head, stride_v_block, stride_v_offset, stride_v_head, BLOCK_N,
                       KV_BLOCK_SIZE, PAGED_TILE, KV_HEADS)
    v_offsets = v_rows[:, None] + dims[None, :]  # [KV_HEADS * BLOCK_N, HEAD_DIM]
    if K_TRANSPOSED:  # [HEAD_DIM, BLOCK_N] straight from memory
        k_offsets = dims[:, None] + k_rows[None, :]
        k_mask = is_key[None, :]
    else:  # rows [BLOCK_N, HEAD_DIM] along memory, transposed in registers for the product
        k_offsets = k_rows[:, None] + dims[None, :]
        k_mask = is_key[:, None]
    if KV_FP8 and WIDEN_K >= 3:  # keys as int32 words of four float8 (rows along memory: no K_TRANSPOSED)
        k_head = k_head.to(tl.pointer_type(tl.int32))
        k_offsets = (k_rows // 4)[:, None] + tl.arange(0, dims.shape[0] // 4)[None, :]
    if KV_FP8 and WIDEN_V >= 3:  # values as int32 words of four float8 (row offsets are multiples of 4)
        v_head = v_head.to(tl.pointer_type(tl.int32))
        v_offsets = (v_rows // 4)[:, None] + tl.arange(0, dims.shape[0] // 4)[None, :]
    if MASKED:
        k = tl.load(k_head + k_offsets, mask=k_mask, other=0.0)
        v = tl.load(v_head + v_offsets, mask=is_key[:, None], other=0.0)
    else:
        k = tl.load(k_head + k_offsets)
        v = tl.load(v_head + v_offsets)
    if not K_TRANSPOSED and not SWAP_AB:
        k = tl.trans(k)  # [HEAD_DIM, BLOCK_N]
    if KV_FP8:  # bit moves leave k (v) times 2^-8: the scores (probabilities) take the 2^8 back
        if FP8_QK:  # keys as stored; values to the 16-bit type of the model's q (fp16 on the GPU)
            v = widen_fp8(v, tl.float16, WIDEN_V)
        else:
            k = widen_fp8(k, q.dtype, WIDEN_K)
            v = widen_fp8(v, q.dtype, WIDEN_V)
            if WIDEN_K == 1 or WIDEN_K == 2:
                qk_scale_log2 = qk_scale_log2 * F16_WIDEN_FACTOR
    if DOT_IN_FP32:  # the CPU interpreter multiplies bf16 bit patterns as integers
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    if SWAP_AB:
        scores = tl.dot(k, q, input_precision=DOT_PRECISION) * qk_scale_log2  # [KV_HEADS * BLOCK_N, GROUP_ROWS]
        is_seen = is_key[:, None]
        if KV_HEADS > 1:
            is_seen = is_seen & (column_kv_head[:, None] == row_kv_head[None, :])
    else:
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [GROUP_ROWS, KV_HEADS * BLOCK_N]
        is_seen = is_key[None, :]
        if KV_HEADS > 1:
            is_seen = is_seen & (row_kv_head[:, None] == column_kv_head[None, :])
    if MASKED or KV_HEADS > 1:
        scores = tl.where(is_seen, scores, float("-inf"))
    if SWAP_AB:  # keys along axis 0
        p, alpha, l_i, m_new = _softmax_step(scores, m_i, l_i, 0, SUM_AT_END)
    else:
        p, alpha, l_i, m_new = _softmax_step(scores, m_i, l_i, 1, SUM_AT_END)
    if KV_FP8 and (WIDEN_V == 1 or WIDEN_V == 2):
        p = p * F16_WIDEN_FACTOR
    p = p.to(v.dtype)
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    if SWAP_AB:
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p, input_precision=DOT_PRECISION)  # [HEAD_DIM, GROUP_ROWS]
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _softmax_step(scores, m_i, l_i, KEY_AXIS: tl.constexpr, SUM_AT_END: tl.constexpr):
    """The probabilities of a tile's ``scores`` (keys along ``KEY_AXIS``) against the rows' new
    running maximum, the factor that rescales what the rows summed before, the new sum and maximum.
    ``SUM_AT_END``: ``l_i`` holds a sum per tile column (:func:`_spread_sum`), each column adds its own."""
    m_new = tl.maximum(m_i, tl.max(scores, KEY_AXIS))
    # A row that has seen no key yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - tl.expand_dims(m_shift, KEY_AXIS))
    alpha = tl.math.exp2(m_i - m_shift)
    if SUM_AT_END:
        l_new = l_i * tl.expand_dims(alpha, KEY_AXIS) + p
    else:
        l_new = l_i * alpha + tl.sum(p, KEY_AXIS)
    return p, alpha, l_new, m_new


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                           tiles: DecodeTiles | None = None, num_splits: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence (token ``i`` belongs to sequence ``i``) over the
    sequence's cached keys, which include this step's. q: [num_seqs, num_heads_per_rank, head_dim];
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads_per_rank, head_dim]. Returns q's shape
    and dtype. ``tiles`` and ``num_splits`` default to :func:`decode_tiles` and
    :func:`choose_num_splits`. A float8 cache is read with ``k_scale``, ``v_scale``
    [num_kv_heads_per_rank] (kernels/kv_quant.py). No host synchronisation."""
    _check_shapes(q, k_cache, v_cache, meta)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    tiles = tiles or decode_tiles(q.dtype, num_seqs * num_kv_heads, num_sms(q.device), is_fp8_kv(k_cache),
                                  num_kv_heads)
    tiles.check(k_cache.shape[1], num_kv_heads)
    num_splits = num_splits or choose_num_splits(num_seqs, num_kv_heads, meta.max_seq_len, num_sms(q.device))
    is_split = num_splits > 1
    # [num_seqs, num_heads, num_splits, head_dim] partial outputs, [..., num_splits] their log2-sum-exp
    partial = torch.empty((num_seqs, num_heads, num_splits, head_dim) if is_split else (0,),
                          dtype=torch.float32, device=q.device)
    lse = torch.empty(partial.shape[:-1] if is_split else (0,), dtype=torch.float32, device=q.device)
    tma = tiles.tma_kv and tma_decode_fits(q, k_cache, v_cache, tiles.kv_heads_per_program, tiles.block_n,
                                           sliding_window)
    counters = None  # the merge inside the pointer kernel, where it has its counters
    if is_split and tiles.fused_merge and not tma:
        counters = split_counters(q.device, num_seqs * (num_kv_heads // tiles.kv_heads_per_program))
    if tma:
        launch_tma_decode(out, partial, lse, q, k_cache, v_cache, meta, scale * _LOG2_E, tiles, num_splits)
    else:
        _launch(out, partial, lse, counters, q, k_cache, v_cache, kernel_scales(k_cache, k_scale, v_scale), meta,
                scale, sliding_window, tiles, num_splits)
    if is_split and counters is None:
        merge_splits(out, partial, lse)
    return out


def _launch(out, partial, lse, counters, q, k_cache, v_cache, scales, meta, scale, sliding_window, tiles,
            num_splits) -> None:
    num_seqs, num_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, _ = k_cache.shape
    kv_heads = tiles.kv_heads_per_program
    group = num_heads // num_kv_heads
    num_programs = num_kv_heads // kv_heads  # per sequence and split
    grid = (num_programs, num_seqs) if tiles.heads_first else (num_seqs, num_programs)
    grid = (num_splits, *grid) if tiles.splits_first else (*grid, num_splits)
    merge_rows = triton.next_power_of_2(group * kv_heads)
    options = {"maxnreg": tiles.max_registers} if tiles.max_registers is not None and q.is_cuda else {}
    pdl = programmatic_launch(q.device)
    _decode_split_kernel[grid](
        out, partial, lse, lse if counters is None else counters, q, k_cache, v_cache, *scales,
        meta.block_tables, meta.seq_lens, num_splits, scale * _LOG2_E, 0 if sliding_window is None else sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
        GROUP=group, GROUP_ROWS=max(tiles.min_group_rows, merge_rows), BLOCK_N=tiles.block_n,
        KV_BLOCK_SIZE=kv_block_size, HEAD_DIM=head_dim, IS_SPLIT=num_splits > 1,
        KV_FP8=is_fp8_kv(k_cache), KV_FP8_AS_F16=fp8_kv_as_f16(q, k_cache),
        USE_WINDOW=sliding_window is not None, DOT_PRECISION=dot_precision(q), DOT_IN_FP32=not q.is_cuda,
        PREFETCH_TABLE=tiles.prefetch_table, K_TRANSPOSED=tiles.k_transposed, PAGED_TILE=tiles.paged_tile,
        HEADS_FIRST=tiles.heads_first, KV_HEADS=kv_heads, SPLITS_FIRST=tiles.splits_first,
        FUSED_MERGE=counters is not None, MERGE_ROWS=merge_rows,
        MERGE_CHUNK=merge_chunk(merge_rows, num_splits, head_dim), MIN_SPLIT_TILES=tiles.min_split_tiles,
        **tiles.tile_switches(q.is_cuda),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, PDL=pdl, launch_pdl=pdl, **options,
    )


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> None:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    assert num_seqs == meta.seq_lens.shape[0], (q.shape, meta.seq_lens.shape)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim={head_dim}: not a power of two >= 16"
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (q.shape, k_cache.shape, v_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    # over an fp8 pool, fp8_widen="words_v" ("words") reads a value (and key) row as 32-bit words
    for cache in (k_cache, v_cache):
        assert not is_fp8_kv(cache) or (cache.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in cache.stride()[:3])), \
            (cache.data_ptr() % 4, cache.stride())
