"""Paged attention for long prefills: a FlashAttention-2 style Triton kernel.

One program takes ``block_q`` consecutive query tokens of one sequence and either one query head
(rows = tokens) or, with ``pack_gqa``, every query head of one KV-head group (row ``m`` = token
``m // group``, head ``m % group``), and walks the sequence's keys ``BLOCK_N`` at a time through
its block table; the cache already holds this step's keys and values after any earlier chunks'
context. The softmax is online, in fp32 with exp2 (log2(e) folded into the scale); both products
are tensor-core dots with fp32 accumulation, and the key loop is software-pipelined
(``num_stages``). Causality takes two phases: the key tiles wholly at or below the block's first
query position run without any mask, then the few tiles on the diagonal are masked; tiles above
the last query position are never read. Programs are ordered longest first (most keys to walk),
the heads of one query block side by side, so that the short blocks of the triangle fill the
tail of the launch.

With ``contiguous_kv`` the keys of the step's own tokens (positions from the sequence's first
query token on) are read from the step's K and V tensors rather than the pool: key
``context_len + i`` is row ``query_start + i`` there, so a tile is a run of consecutive rows, and
with ``tma_kv`` one tensor-descriptor load (a TMA bulk copy on Hopper). Only a cached prefix
(earlier chunks, prefix-cache hits) is gathered from the pool through the block table; every row
sees all of it, so only its last, partial tile is masked (by its end).

No sliding window, no float8 cache (the unified kernel of :mod:`meshlm.kernels.triton_attention`
runs those); tile shapes come from :func:`meshlm.kernels.prefill_tiles.prefill_tiles`. Semantics
are those of :func:`meshlm.kernels.attention.paged_attention_reference`.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from meshlm.kernels.attention import AttentionMetadata
from meshlm.kernels.prefill_tiles import SHARED_MARGIN_BYTES, TMA_MIN_TOKENS, PrefillTiles, prefill_tiles
from meshlm.kernels.triton_launch import dot_precision

_LOG2_E = 1.4426950408889634


# Values that change from batch to batch are not specialised on, so serving compiles once per model.
@triton.jit(do_not_specialize=["num_seqs", "block_q", "stride_table_seq"])
def _prefill_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, k_new, v_new, block_tables_ptr, seq_lens_ptr,
        query_start_loc_ptr, program_map_ptr, num_seqs, num_head_slots, group, block_q, qk_scale_log2,
        stride_q_token, stride_q_head, stride_o_token, stride_o_head,
        stride_kv_block, stride_kv_offset, stride_kv_head, stride_table_seq,
        stride_k_new_token, stride_k_new_head, stride_v_new_token, stride_v_new_head,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        PACK_GQA: tl.constexpr, K_TRANSPOSED: tl.constexpr, PREFETCH_TABLE: tl.constexpr,
        CONTIGUOUS_KV: tl.constexpr, TMA_KV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    program = tl.program_id(0)
    head_slot = program % num_head_slots  # a KV head (pack_gqa) or a query head
    item = program // num_head_slots
    seq = tl.load(program_map_ptr + 2 * item)
    query_block = tl.load(program_map_ptr + 2 * item + 1)
    if seq >= num_seqs:  # spare program of a grid sized from shapes only
        return

    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    if PACK_GQA:
        kv_head = head_slot
        query_index = query_block * block_q + rows // group  # [BLOCK_M] within the sequence
        head = kv_head * group + rows % group  # [BLOCK_M]
        is_row = (rows < block_q * group) & (query_index < query_len)
    else:
        kv_head = head_slot // group
        query_index = query_block * block_q + rows
        head = head_slot + tl.zeros([BLOCK_M], dtype=tl.int32)
        is_row = query_index < query_len
    token = (query_start + query_index).to(tl.int64)  # [BLOCK_M] row of q and out
    query_pos = context_len + query_index  # [BLOCK_M]
    q_offsets = token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=is_row[:, None], other=0.0)  # [BLOCK_M, HEAD_DIM]

    # Keys below full_end are visible to every row of the block (they are at or before its first
    # query position); keys from there to key_end (its last query position + 1) are masked.
    first_pos = context_len + query_block * block_q
    key_end = tl.minimum(seq_len, first_pos + block_q)
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_seq
    k_head = k_cache_ptr + kv_head * stride_kv_head
    v_head = v_cache_ptr + kv_head * stride_kv_head
    pool_end = key_end
    pool_full_end = full_end
    if CONTIGUOUS_KV:
        # The pool holds only the prefix before the first query token, which every row sees whole;
        # the step's own keys follow in the step's K and V, counted from its first query token, so
        # their causal mask compares indices within the step (key i is seen by query rows >= i).
        pool_end = context_len
        pool_full_end = context_len // BLOCK_N * BLOCK_N
    blocks = _tile_blocks(table_row, 0, pool_end, BLOCK_N, KV_BLOCK_SIZE)  # read ahead (PREFETCH_TABLE)
    acc, l_i, m_i, blocks = _walk_keys(
        acc, l_i, m_i, blocks, q, table_row, k_head, v_head, 0, pool_full_end, pool_end, query_pos, dims,
        qk_scale_log2, stride_kv_block, stride_kv_offset, BLOCK_N, KV_BLOCK_SIZE, K_TRANSPOSED, False,
        PREFETCH_TABLE, DOT_PRECISION)
    acc, l_i, m_i, blocks = _walk_keys(
        acc, l_i, m_i, blocks, q, table_row, k_head, v_head, pool_full_end, pool_end, pool_end, query_pos, dims,
        qk_scale_log2, stride_kv_block, stride_kv_offset, BLOCK_N, KV_BLOCK_SIZE, K_TRANSPOSED, True,
        PREFETCH_TABLE, DOT_PRECISION)
    if CONTIGUOUS_KV:
        first_index = query_block * block_q
        new_full_end = (first_index + 1) // BLOCK_N * BLOCK_N
        new_key_end = tl.minimum(query_len, first_index + block_q)
        if TMA_KV:  # descriptors over [num_tokens, num_kv_heads * head_dim]: the head is a column offset
            k_rows = k_new
            v_rows = v_new
        else:
            k_rows = k_new + kv_head * stride_k_new_head
            v_rows = v_new + kv_head * stride_v_new_head
        acc, l_i, m_i = _walk_new_keys(
            acc, l_i, m_i, q, k_rows, v_rows, query_start, kv_head, 0, new_full_end, new_key_end, query_index,
            dims, qk_scale_log2, stride_k_new_token, stride_v_new_token, BLOCK_N, HEAD_DIM, K_TRANSPOSED, False,
            TMA_KV, DOT_PRECISION)
        acc, l_i, m_i = _walk_new_keys(
            acc, l_i, m_i, q, k_rows, v_rows, query_start, kv_head, new_full_end, new_key_end, new_key_end,
            query_index, dims, qk_scale_log2, stride_k_new_token, stride_v_new_token, BLOCK_N, HEAD_DIM,
            K_TRANSPOSED, True, TMA_KV, DOT_PRECISION)

    # Every row saw at least one key (key 0 is visible to all), so l_i > 0.
    acc = acc / l_i[:, None]
    o_offsets = token[:, None] * stride_o_token + head[:, None] * stride_o_head + dims[None, :]
    tl.store(out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


@triton.jit
def _walk_keys(acc, l_i, m_i, blocks, q, table_row, k_head, v_head, start, end, key_end, query_pos, dims,
               qk_scale_log2, stride_kv_block, stride_kv_offset, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
               K_TRANSPOSED: tl.constexpr, MASKED: tl.constexpr, PREFETCH_TABLE: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """The online softmax over key tiles [start, end), causally masked or not (``MASKED``);
    ``blocks`` holds the block ids of the tile at ``start`` (PREFETCH_TABLE) and comes back holding
    those of the tile at ``end``."""
    for tile_start in range(start, end, BLOCK_N):
        if PREFETCH_TABLE:
            block = blocks
            blocks = _tile_blocks(table_row, tile_start + BLOCK_N, key_end, BLOCK_N, KV_BLOCK_SIZE)
        else:
            block = _tile_blocks(table_row, tile_start, key_end, BLOCK_N, KV_BLOCK_SIZE)
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, block, k_head, v_head, tile_start, key_end, query_pos, dims, qk_scale_log2,
            stride_kv_block, stride_kv_offset, BLOCK_N, KV_BLOCK_SIZE, K_TRANSPOSED, MASKED, DOT_PRECISION)
    return acc, l_i, m_i, blocks


@triton.jit
def _tile_blocks(table_row, tile_start, key_end, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N] int64 cache block of each key of the tile at ``tile_start``; block 0 past key_end
    (a tile past the sequence's last table column reads none of it)."""
    keys = tl.arange(0, BLOCK_N)
    # tile_start is a multiple of BLOCK_N and both sizes are powers of two: the scalar part is
    # divided once, the per-key part is a constant of each thread's keys
    column = tile_start // KV_BLOCK_SIZE + keys // KV_BLOCK_SIZE
    return tl.load(table_row + column, mask=tile_start + keys < key_end, other=0).to(tl.int64)


@triton.jit
def _walk_new_keys(acc, l_i, m_i, q, k_rows, v_rows, query_start, kv_head, start, end, key_end, query_index, dims,
                   qk_scale_log2, stride_k_token, stride_v_token, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   K_TRANSPOSED: tl.constexpr, MASKED: tl.constexpr, TMA_KV: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """The online softmax over the step's own keys [start, end) (indices from the sequence's first
    query token: rows ``query_start + index`` of the step's K and V), causally masked or not."""
    keys = tl.arange(0, BLOCK_N)
    for tile_start in range(start, end, BLOCK_N):
        key_index = tile_start + keys  # [BLOCK_N]
        is_key = key_index < key_end
        if TMA_KV:
            # One bulk copy a tile; rows past the sequence are another sequence's keys, or zeros
            # past the tensor: the scores mask those keys, and their values are zeroed.
            row = query_start + tile_start
            k = k_rows.load([row, kv_head * HEAD_DIM])  # [BLOCK_N, HEAD_DIM]
            v = v_rows.load([row, kv_head * HEAD_DIM])
            if MASKED:
                v = tl.where(is_key[:, None], v, 0.0)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, key_index, is_key, query_index, qk_scale_log2,
                                          False, MASKED, DOT_PRECISION)
        else:
            token = (query_start + key_index).to(tl.int64)  # [BLOCK_N] rows of the step's K and V
            k, v = _load_kv(k_rows, v_rows, token * stride_k_token, token * stride_v_token, dims, is_key,
                            K_TRANSPOSED, MASKED)
            acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, key_index, is_key, query_index, qk_scale_log2,
                                          K_TRANSPOSED, MASKED, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _attend_tile(acc, l_i, m_i, q, block, k_head, v_head, tile_start, key_end, query_pos, dims, qk_scale_log2,
                 stride_kv_block, stride_kv_offset, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                 K_TRANSPOSED: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over pool keys [tile_start, tile_start + BLOCK_N) held in cache
    blocks ``block``; MASKED=False only for tiles that every row sees whole. K and V share their
    strides."""
    keys = tl.arange(0, BLOCK_N)
    key_pos = tile_start + keys  # [BLOCK_N]
    is_key = key_pos < key_end
    offset = tile_start % KV_BLOCK_SIZE + keys % KV_BLOCK_SIZE  # as in _tile_blocks
    key_rows = block * stride_kv_block + offset * stride_kv_offset  # [BLOCK_N] int64, K's and V's
    k, v = _load_kv(k_head, v_head, key_rows, key_rows, dims, is_key, K_TRANSPOSED, MASKED)
    return _softmax_step(acc, l_i, m_i, q, k, v, key_pos, is_key, query_pos, qk_scale_log2, K_TRANSPOSED, MASKED,
                         DOT_PRECISION)


@triton.jit
def _load_kv(k_base, v_base, k_rows, v_rows, dims, is_key, K_TRANSPOSED: tl.constexpr, MASKED: tl.constexpr):
    """K as [BLOCK_N, HEAD_DIM] ([HEAD_DIM, BLOCK_N] with K_TRANSPOSED) and V as [BLOCK_N, HEAD_DIM],
    from the element offset of each key's row [BLOCK_N]; MASKED: keys off ``is_key`` may hold
    anything, NaN included, and read as zeros."""
    v_offsets = v_rows[:, None] + dims[None, :]  # [BLOCK_N, HEAD_DIM]
    if K_TRANSPOSED:  # [HEAD_DIM, BLOCK_N]
        k_offsets = k_rows[None, :] + dims[:, None]
        k_mask = is_key[None, :]
    else:
        k_offsets = k_rows[:, None] + dims[None, :]
        k_mask = is_key[:, None]
    if MASKED:
        k = tl.load(k_base + k_offsets, mask=k_mask, other=0.0)
        v = tl.load(v_base + v_offsets, mask=is_key[:, None], other=0.0)
    else:
        k = tl.load(k_base + k_offsets)
        v = tl.load(v_base + v_offsets)
    return k, v


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, key_pos, is_key, query_pos, qk_scale_log2, K_TRANSPOSED: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The scores of q against one tile of keys at ``key_pos`` (MASKED: causally, against the rows'
    ``query_pos``, and keys off ``is_key``), and the online-softmax update of the rows' sums."""
    if K_TRANSPOSED:
        scores = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    else:
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        visible = (key_pos[None, :] <= query_pos[:, None]) & is_key[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    # Scores are in log2 units once scaled; every row has a finite maximum from its first tile on.
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale_log2)
    p = tl.math.exp2(scores * qk_scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # accumulates in place
    return acc, l_i, m_new


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, tiles: PrefillTiles | None = None, out: torch.Tensor | None = None,
                      new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's cached keys, by the prefill kernel.

    q: [num_tokens, num_heads_per_rank, head_dim]; k_cache, v_cache: [num_blocks, block_size,
    num_kv_heads_per_rank, head_dim] in q's dtype, already holding this step's keys and values.
    Returns [num_tokens, num_heads_per_rank, head_dim] in q's dtype, with no host synchronisation.
    Any batch gives the reference's result (decodes included); ``tiles`` default to
    :func:`prefill_tiles` of the model's heads. ``out``: where to write the result (q's shape,
    last dimension contiguous), e.g. rows of a larger batch's output. ``new_kv``: this step's keys
    (rotated) and values, each [num_tokens, num_kv_heads_per_rank, head_dim] in q's dtype with unit
    stride along head_dim (any token and head strides: views of the QKV projection's output do),
    the values the cache holds at the step's slots; tiles with ``contiguous_kv`` need them.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, kv_block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = meta.seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim={head_dim}: not a power of two >= 16"
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (q.shape, k_cache.shape)
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride() == k_cache.stride(), \
        (q.stride(), k_cache.stride(), v_cache.stride())
    assert kv_block_size & (kv_block_size - 1) == 0, f"KV block size {kv_block_size}: not a power of two"
    if out is None:
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, (out.shape, out.dtype, q.shape)
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    tiles = tiles or default_tiles(head_dim, group, q.dtype, new_kv, q.device)
    tiles.check(group)
    block_q = tiles.query_tokens(group)
    program_map = _program_map(meta, block_q, num_tokens, q.device)
    num_head_slots = num_kv_heads if tiles.pack_gqa else num_heads
    k_new, v_new, new_strides = _new_kv_args(new_kv, tiles, q, k_cache)
    _prefill_attention_kernel[(num_head_slots * program_map.shape[0],)](
        out, q, k_cache, v_cache, k_new, v_new, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        program_map, num_seqs, num_head_slots, group, block_q, scale * _LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0), *new_strides,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, KV_BLOCK_SIZE=kv_block_size, HEAD_DIM=head_dim,
        PACK_GQA=tiles.pack_gqa, K_TRANSPOSED=tiles.k_transposed, PREFETCH_TABLE=tiles.prefetch_table,
        CONTIGUOUS_KV=tiles.contiguous_kv, TMA_KV=tiles.tma_kv, DOT_PRECISION=dot_precision(q),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def _new_kv_args(new_kv: tuple[torch.Tensor, torch.Tensor] | None, tiles: PrefillTiles, q: torch.Tensor,
                 k_cache: torch.Tensor) -> tuple:
    """The kernel's ``k_new``, ``v_new`` and their (token, head) strides: with ``contiguous_kv`` the
    step's K and V (``tma_kv``: as tensor descriptors); without, the cache, which the kernel then
    never reads through them."""
    if not tiles.contiguous_kv:
        return k_cache, k_cache, (0, 0, 0, 0)
    if new_kv is None:
        raise ValueError(f"{tiles}: contiguous_kv reads this step's keys and values apart, and no new_kv came")
    expected = (q.shape[0], k_cache.shape[2], q.shape[2])  # [num_tokens, num_kv_heads_per_rank, head_dim]
    for name, x in zip("kv", new_kv):
        if tuple(x.shape) != expected or x.dtype != q.dtype or x.stride(2) != 1:
            raise ValueError(f"new_kv's {name}: shape {tuple(x.shape)}, {x.dtype}, strides {x.stride()}; the kernel "
                             f"takes {expected} in {q.dtype} with unit stride along head_dim")
    k, v = new_kv
    strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    if tiles.tma_kv:
        return _tile_descriptor(k, tiles.block_n), _tile_descriptor(v, tiles.block_n), strides
    return k, v, strides


def default_tiles(head_dim: int, group: int, dtype: torch.dtype,
                  new_kv: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device | None = None) -> PrefillTiles:
    """:func:`prefill_tiles` within ``device``'s shared memory (a GPU's; sm_90's elsewhere), reading
    the step's own keys apart only when ``new_kv`` came, and by tensor descriptors only for steps of
    ``TMA_MIN_TOKENS`` tokens or more, where TMA can load them (else by pointers)."""
    if device is not None and device.type == "cuda":
        tiles = prefill_tiles(head_dim, group, dtype, shared_memory_per_program(device))
    else:
        tiles = prefill_tiles(head_dim, group, dtype)
    if new_kv is None:  # the step's own keys are then only in the cache
        return replace(tiles, contiguous_kv=False, tma_kv=False)
    if tiles.tma_kv and (new_kv[0].shape[0] < TMA_MIN_TOKENS or not all(tma_loadable(x) for x in new_kv)):
        return replace(tiles, tma_kv=False)
    return tiles


@functools.lru_cache(maxsize=None)
def shared_memory_per_program(device: torch.device) -> int:
    """The shared memory the kernel's tiles may take on GPU ``device`` (its limit a block, less a margin)."""
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin - SHARED_MARGIN_BYTES


def tma_loadable(x: torch.Tensor) -> bool:
    """Whether ``tma_kv`` can load x [num_tokens, num_kv_heads, head_dim]: heads side by side, the
    start and the token stride 16-byte aligned."""
    return x.stride(1) == x.shape[2] and x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0


def _tile_descriptor(x: torch.Tensor, block_n: int) -> TensorDescriptor:
    """A host tensor descriptor of x [num_tokens, num_kv_heads, head_dim] seen as [num_tokens,
    num_kv_heads * head_dim] (heads side by side in a token's row), loading [block_n, head_dim]
    tiles. Made on the host and passed by value (a CUtensorMap kernel parameter on Hopper), it needs
    no global scratch memory, unlike descriptors made in the kernel (``tl.make_tensor_descriptor``,
    which want ``triton.set_allocator``). TMA wants 16-byte aligned addresses and row strides."""
    num_tokens, num_kv_heads, head_dim = x.shape
    row_bytes = x.stride(0) * x.element_size()
    if not tma_loadable(x):
        raise ValueError(f"tma_kv: shape {tuple(x.shape)}, strides {x.stride()}, address {x.data_ptr():#x}: heads "
                         f"must lie side by side (head stride {head_dim}), the start and the {row_bytes}-byte token "
                         f"stride 16-byte aligned")
    rows = x.as_strided((num_tokens, num_kv_heads * head_dim), (x.stride(0), 1))  # [num_tokens, heads * head_dim]
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [block_n, head_dim])


def _program_map(meta: AttentionMetadata, block_q: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """[num_items, 2] int32: (sequence, query block within it) of each query block, the blocks with
    the most keys to walk first; the heads of one block are neighbouring programs.

    The grid is sized from shapes only (``num_tokens // block_q + num_seqs`` bounds the number of
    query blocks), so no value leaves the device; spare items get sequence ``num_seqs``, last.
    """
    is_capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    key = ("prefill_program_map", block_q, is_capturing)  # a capture's map is the graph's own
    if key in meta.derived:
        return meta.derived[key]
    num_seqs = meta.seq_lens.shape[0]
    num_items = num_tokens // block_q + num_seqs
    query_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]  # [num_seqs]
    blocks = (query_lens + block_q - 1) // block_q  # [num_seqs] query blocks of each sequence
    block_ends = torch.cumsum(blocks, 0)  # [num_seqs] int64
    item = torch.arange(num_items, device=device)  # [num_items] int64
    seq = torch.searchsorted(block_ends, item, right=True)  # [num_items] in [0, num_seqs]
    real_seq = seq.clamp(max=num_seqs - 1)
    query_block = item - (block_ends - blocks)[real_seq]  # [num_items]
    query_ends = (meta.seq_lens - query_lens)[real_seq] + (query_block + 1) * block_q  # [num_items]
    work = torch.where(seq < num_seqs, torch.minimum(query_ends, meta.seq_lens[real_seq]), -1)  # keys walked
    order = torch.argsort(work, descending=True, stable=True)  # [num_items]
    program_map = torch.stack((seq[order], query_block[order]), dim=1).to(torch.int32).contiguous()
    meta.derived[key] = program_map
    return program_map
