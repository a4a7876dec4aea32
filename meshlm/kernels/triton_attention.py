"""Paged attention for the GPU: the entry point, and one Triton kernel for prefill chunks and
decodes together. Batches of decodes only go to the split-KV decode kernel
(:mod:`meshlm.kernels.decode_attention`), long prefills to the prefill kernel
(:mod:`meshlm.kernels.prefill_attention`, by the rule of
:func:`meshlm.kernels.prefill_tiles.uses_prefill_kernel`; decodes ahead of them to the decode
kernel); the unified kernel runs every other batch, except that at least ``MIN_DECODES_APART``
decodes ahead of short prefill chunks (a step of in-flight batching) go to the decode kernel too.

The kernel follows the layout of vLLM's "unified attention": the grid is (query blocks across
all sequences, KV heads). One program takes ``block_q = BLOCK_M // group`` consecutive query
tokens of one sequence and every query head of one KV-head group, packed into the tile's rows
(row ``m`` is query token ``m // group``, head ``m % group`` of the group), so a decode with a
single query token still fills a tile with its whole GQA group. The program walks the
sequence's keys ``BLOCK_N`` at a time through the block table, with an online softmax in fp32
(exp2, log2(e) folded into the scale) and causal plus sliding-window masking. It stops at its
last query token's position, so tiles above the causal diagonal are never read, and masks only
the tiles on the diagonal (or on the window's edge); the tiles below go unmasked. The tile sizes
come from :func:`meshlm.kernels.attention_tiles.unified_tiles`.

Semantics are those of :func:`meshlm.kernels.attention.paged_attention_reference`.

CUDA graphs: with ``meta.max_query_len == 1`` (a decode batch) program ``i`` is sequence ``i``
and nothing is computed on the side, so capture and replay need only the metadata tensors to
be updated in place. Mixed batches map programs to (sequence, query block) with a few torch ops
on the device, computed once per step and kept in ``meta.derived`` for the other layers; a graph
capture computes its own map in the graph (once, for all its layers) rather than take an eager one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshlm.kernels.attention import AttentionMetadata
from meshlm.kernels.attention_tiles import UnifiedTiles, check_tiles, unified_tiles
from meshlm.kernels.decode_attention import paged_decode_attention
from meshlm.kernels.prefill_attention import default_tiles, prefill_attention
from meshlm.kernels.prefill_tiles import PrefillTiles, num_leading_decodes, uses_prefill_kernel
from meshlm.kernels.triton_launch import dot_precision
from meshlm.kernels.kv_quant import fp8_kv_as_f16, is_fp8_kv, kernel_scales

_LOG2_E = 1.4426950408889634
# Decodes ahead of short prefill chunks that run apart, by the decode kernel (one more launch): on
# an H200 (attention_bench.py, CUDA graphs) the decode kernel read 1700 x 192 keys in 210 us against
# the unified kernel's 459 us over an fp8 pool (323 / 506 us over bf16) and 600 x 1536 in 516 /
# 662 us (fp8; bf16 854 / 884 us). Below this many, a launch's few microseconds weigh more.
MIN_DECODES_APART = 32


# Values that change from batch to batch are not specialised on, so serving compiles once per model.
@triton.jit(do_not_specialize=["num_seqs", "group", "block_q", "sliding_window", "stride_table_seq"])
def _unified_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
        block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, program_map_ptr,
        num_seqs, group, block_q, qk_scale_log2, sliding_window,
        stride_q_token, stride_q_head, stride_o_token, stride_o_head,
        stride_k_block, stride_k_offset, stride_k_head,
        stride_v_block, stride_v_offset, stride_v_head,
        stride_table_seq,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        KV_BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PROGRAM_MAP: tl.constexpr,
        USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
        KV_FP8_AS_F16: tl.constexpr):
    program = tl.program_id(0)
    kv_head = tl.program_id(1)
    if USE_PROGRAM_MAP:
        seq = tl.load(program_map_ptr + 2 * program)
        query_block = tl.load(program_map_ptr + 2 * program + 1)
    else:
        seq = program
        query_block = 0
    if seq >= num_seqs:  # spare program of a grid sized from shapes only
        return

    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    query_index = query_block * block_q + rows // group  # [BLOCK_M] within the sequence
    head = kv_head * group + rows % group  # [BLOCK_M]
    is_row = (rows < block_q * group) & (query_index < query_len)
    token = (query_start + query_index).to(tl.int64)  # [BLOCK_M] row of q and out
    query_pos = context_len + query_index  # [BLOCK_M]

    q_offsets = token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=is_row[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]
    if KV_FP8_AS_F16:  # float8 converts to fp16 in one instruction per pair, to bf16 in several
        q = q.to(tl.float16)
    if KV_FP8:  # keys are stored / k_scale: the head's scale multiplies the scores instead
        qk_scale_log2 = qk_scale_log2 * tl.load(k_scale_ptr + kv_head)

    # Key ranges of this query block, from its first and last query positions: keys below
    # full_end are causally visible to every row, keys from full_start on are inside every
    # row's window; tiles wholly between the two need no mask.
    first_pos = context_len + query_block * block_q
    key_end = tl.minimum(seq_len, first_pos + block_q)  # last query position + 1
    key_start = 0
    full_start = 0
    if USE_WINDOW:
        key_start = (tl.maximum(first_pos - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        full_start = tl.cdiv(tl.maximum(key_end - sliding_window, 0), BLOCK_N) * BLOCK_N
    full_end = tl.maximum((first_pos + 1) // BLOCK_N * BLOCK_N, full_start)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    k_head = k_cache_ptr + kv_head * stride_k_head
    v_head = v_cache_ptr + kv_head * stride_v_head
    if USE_WINDOW:
        for tile_start in range(key_start, full_start, BLOCK_N):
            acc, l_i, m_i = _attend_tile(
                acc, l_i, m_i, q, k_head, v_head, table_row, tile_start, key_end, query_pos, is_row, dims,
                qk_scale_log2, sliding_window, stride_k_block, stride_k_offset, stride_v_block,
                stride_v_offset, BLOCK_N, KV_BLOCK_SIZE, DOT_PRECISION, True, USE_WINDOW, KV_FP8)
    for tile_start in range(full_start, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_head, v_head, table_row, tile_start, key_end, query_pos, is_row, dims,
            qk_scale_log2, sliding_window, stride_k_block, stride_k_offset, stride_v_block,
            stride_v_offset, BLOCK_N, KV_BLOCK_SIZE, DOT_PRECISION, False, USE_WINDOW, KV_FP8)
    for tile_start in range(full_end, key_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_head, v_head, table_row, tile_start, key_end, query_pos, is_row, dims,
            qk_scale_log2, sliding_window, stride_k_block, stride_k_offset, stride_v_block,
            stride_v_offset, BLOCK_N, KV_BLOCK_SIZE, DOT_PRECISION, True, USE_WINDOW, KV_FP8)

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if KV_FP8:  # values are stored / v_scale: the weighted sum is scaled back once
        acc = acc * tl.load(v_scale_ptr + kv_head)
    o_offsets = token[:, None] * stride_o_token + head[:, None] * stride_o_head + dims[None, :]
    tl.store(out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_head, v_head, table_row, tile_start, key_end, query_pos, is_row, dims,
                 qk_scale_log2, sliding_window, stride_k_block, stride_k_offset, stride_v_block,
                 stride_v_offset, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr, USE_WINDOW: tl.constexpr,
                 KV_FP8: tl.constexpr):
    """One online-softmax step over keys [tile_start, tile_start + BLOCK_N); MASKED=False only for
    tiles that every row sees whole. ``KV_FP8``: k and v are float8, converted exactly to q's dtype
    (their scales are applied by the caller)."""
    key_pos = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    is_key = key_pos < key_end
    if MASKED:
        block = tl.load(table_row + key_pos // KV_BLOCK_SIZE, mask=is_key, other=0).to(tl.int64)
    else:
        block = tl.load(table_row + key_pos // KV_BLOCK_SIZE).to(tl.int64)
    offset = key_pos % KV_BLOCK_SIZE
    k_offsets = block[None, :] * stride_k_block + offset[None, :] * stride_k_offset + dims[:, None]
    v_offsets = block[:, None] * stride_v_block + offset[:, None] * stride_v_offset + dims[None, :]
    if MASKED:
        k = tl.load(k_head + k_offsets, mask=is_key[None, :], other=0.0)  # [HEAD_DIM, BLOCK_N]
        v = tl.load(v_head + v_offsets, mask=is_key[:, None], other=0.0)  # [BLOCK_N, HEAD_DIM]
    else:
        k = tl.load(k_head + k_offsets)
        v = tl.load(v_head + v_offsets)
    if KV_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)

    scores = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = is_row[:, None] & is_key[None, :] & (key_pos[None, :] <= query_pos[:, None])
        if USE_WINDOW:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen no key yet keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(scores - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                           new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's cached keys.

    q: [num_tokens, num_heads_per_rank, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads_per_rank, head_dim], already holding this step's keys and values. Returns
    [num_tokens, num_heads_per_rank, head_dim] in q's dtype. Makes no host synchronisation.
    Decode batches (one query token per sequence) take the split-KV decode kernel, long prefills
    the prefill kernel (decodes ahead of them the decode kernel), every other batch the unified
    kernel. A float8 cache is read with ``k_scale``, ``v_scale`` [num_kv_heads_per_rank]
    (kernels/kv_quant.py). ``new_kv``: this step's rotated keys and values [num_tokens,
    num_kv_heads_per_rank, head_dim] (unit stride along head_dim), which the prefill kernel reads
    instead of the cache's copy when its tiles have ``contiguous_kv``.
    """
    if meta.max_query_len == 1 and q.shape[0] == meta.seq_lens.shape[0]:
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale=k_scale,
                                      v_scale=v_scale)
    head_dim, group = q.shape[2], q.shape[1] // k_cache.shape[2]
    tiles = default_tiles(head_dim, group, q.dtype, new_kv, q.device)
    num_decodes = num_leading_decodes(meta.query_lens_host)
    chunk_lens = meta.query_lens_host[num_decodes:]
    if uses_prefill_kernel(chunk_lens, q.dtype, k_cache.dtype, head_dim, group, sliding_window, tiles):
        if num_decodes == 0:
            return prefill_attention(q, k_cache, v_cache, meta, scale, tiles, new_kv=new_kv)
        return _decodes_then_chunks(q, k_cache, v_cache, meta, scale, num_decodes, tiles, new_kv=new_kv)
    if num_decodes >= MIN_DECODES_APART and len(chunk_lens):
        return _decodes_then_chunks(q, k_cache, v_cache, meta, scale, num_decodes, None, sliding_window,
                                    k_scale, v_scale)
    return unified_attention(q, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale)


def _decodes_then_chunks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                         scale: float, num_decodes: int, tiles: PrefillTiles | None,
                         sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None,
                         new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """A batch of ``num_decodes`` decodes, then prefill chunks: the decodes by the decode kernel,
    the chunks by the prefill kernel (``tiles``, with the chunks' rows of ``new_kv``) or, with
    ``tiles`` None, by the unified kernel; into one output."""
    key = ("decodes_then_chunks", num_decodes)  # the two parts' metadata, shared by the step's layers
    if key not in meta.derived:
        meta.derived[key] = (_rows_metadata(meta, 0, num_decodes), _rows_metadata(meta, num_decodes, None))
    decodes, chunks = meta.derived[key]
    num_decode_tokens = num_decodes  # one token each, first in the batch
    out = torch.empty_like(q)
    out[:num_decode_tokens] = paged_decode_attention(q[:num_decode_tokens], k_cache, v_cache, decodes, scale,
                                                     sliding_window, k_scale=k_scale, v_scale=v_scale)
    if tiles is None:
        out[num_decode_tokens:] = unified_attention(q[num_decode_tokens:], k_cache, v_cache, chunks, scale,
                                                    sliding_window, k_scale, v_scale)
        return out
    chunk_kv = None if new_kv is None else tuple(x[num_decode_tokens:] for x in new_kv)
    prefill_attention(q[num_decode_tokens:], k_cache, v_cache, chunks, scale, tiles, out=out[num_decode_tokens:],
                      new_kv=chunk_kv)
    return out


def _rows_metadata(meta: AttentionMetadata, first: int, end: int | None) -> AttentionMetadata:
    """The metadata of sequences [first, end) of the batch, their tokens renumbered from 0.

    Every tensor is a fresh copy, not a view into the batch's: Triton specializes a kernel on
    whether each pointer argument is 16-byte aligned, so views starting after ``first`` decodes
    would compile the kernels again for each alignment that the step's count of decodes gives."""
    query_start_loc = meta.query_start_loc[first:None if end is None else end + 1]  # [num_seqs + 1]
    token_start = int(meta.query_lens_host[:first].sum())  # from the host: no synchronisation
    token_end = None if end is None else int(meta.query_lens_host[:end].sum())
    query_lens = meta.query_lens_host[first:end]
    return AttentionMetadata(
        positions=meta.positions[token_start:token_end].clone(),
        slot_mapping=meta.slot_mapping[token_start:token_end].clone(),
        query_start_loc=query_start_loc - token_start, seq_lens=meta.seq_lens[first:end].clone(),
        block_tables=meta.block_tables[first:end].clone(), max_query_len=int(query_lens.max()),
        max_seq_len=meta.max_seq_len, query_lens_host=query_lens)


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      tiles: UnifiedTiles | None = None) -> torch.Tensor:
    """:func:`paged_attention_triton` by the unified kernel, for any batch; ``tiles`` default to
    :func:`unified_tiles` of the batch's shape."""
    num_tokens, num_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = meta.seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim={head_dim}: not a power of two >= 16"
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, \
        (q.shape, k_cache.shape, v_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    tiles = tiles or unified_tiles(head_dim, group, meta.max_query_len, q.dtype)
    check_tiles(tiles, group)
    block_q = tiles.block_m // group
    is_decode_batch = meta.max_query_len == 1
    if is_decode_batch:
        program_map, num_programs = meta.query_start_loc, num_seqs  # the map is not read
    else:
        program_map = _program_map(meta, block_q, num_tokens, q.device)
        num_programs = program_map.shape[0]

    k_scale, v_scale = kernel_scales(k_cache, k_scale, v_scale)
    _unified_attention_kernel[(num_programs, num_kv_heads)](
        out, q, k_cache, v_cache, k_scale, v_scale,
        meta.block_tables, meta.seq_lens, meta.query_start_loc, program_map,
        num_seqs, group, block_q, scale * _LOG2_E, 0 if sliding_window is None else sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0),
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        KV_BLOCK_SIZE=kv_block_size, HEAD_DIM=head_dim, USE_PROGRAM_MAP=not is_decode_batch,
        USE_WINDOW=sliding_window is not None, DOT_PRECISION=dot_precision(q), KV_FP8=is_fp8_kv(k_cache),
        KV_FP8_AS_F16=fp8_kv_as_f16(q, k_cache),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def _program_map(meta: AttentionMetadata, block_q: int, num_tokens: int,
                 device: torch.device) -> torch.Tensor:
    """[num_programs, 2] int32: (sequence, query block within it) of each program on grid axis 0.

    The grid is sized from shapes only (``num_tokens // block_q + num_seqs`` bounds the number
    of query blocks), so no value leaves the device; spare programs get sequence ``num_seqs``.
    """
    # A map computed in a graph capture is the graph's own (its nodes recompute it at each replay):
    # kept apart from an eager one, it serves every layer of that capture.
    is_capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = ("triton_program_map", block_q, is_capturing)
    if key in meta.derived:
        return meta.derived[key]
    num_seqs = meta.seq_lens.shape[0]
    num_programs = num_tokens // block_q + num_seqs
    query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]  # [num_seqs]
    blocks = (query_lens + block_q - 1) // block_q  # [num_seqs] query blocks of each sequence
    block_ends = torch.cumsum(blocks, 0)  # [num_seqs] int64
    program = torch.arange(num_programs, device=device)  # [num_programs] int64
    seq = torch.searchsorted(block_ends, program, right=True)  # [num_programs] in [0, num_seqs]
    first_block = (block_ends - blocks)[seq.clamp(max=num_seqs - 1)]  # [num_programs]
    program_map = torch.stack((seq, program - first_block), dim=1).to(torch.int32).contiguous()
    meta.derived[key] = program_map
    return program_map
