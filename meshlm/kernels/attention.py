"""Attention over the paged KV cache: metadata, rotary embeddings, and the reference path.

The KV cache of one layer on one rank is ``[num_blocks, block_size, num_kv_heads_per_rank,
head_dim]``; token ``i`` of a sequence lives in block ``block_table[i // block_size]`` at
offset ``i % block_size`` ("slot" = block * block_size + offset).

The reference path is plain torch, works on packed variable-length batches without a loop over
sequences (decode rows and prefill rows are two padded batches), and is what the GPU kernels
are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from meshlm.kernels.fused_ops import TORCH_OPS
from meshlm.kernels.rope_scaling import rope_inv_freq
from meshlm.kernels.kv_quant import dequantize_kv, is_fp8_kv


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step tensors that every attention layer of the step shares."""

    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in the cache once this step has written
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    query_lens_host: np.ndarray  # [num_seqs] on the host, to split decodes from prefills
    # Tensors an attention backend derives from the fields above once per step and every layer
    # reuses (e.g. the Triton kernel's program-to-sequence map); keyed by the backend.
    derived: dict = field(default_factory=dict)


class RotaryEmbedding:
    """Rotate-half rotary embedding (Hugging Face layout) with optional rope scaling
    (:mod:`meshlm.kernels.rope_scaling`: linear, dynamic, yarn, llama3)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict | None, device: torch.device):
        inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        # yarn's attention factor scales cos and sin, as in transformers
        self.cos = (freqs.cos() * attention_factor).to(device)  # [max_positions, head_dim / 2] fp32
        self.sin = (freqs.sin() * attention_factor).to(device)
        self.ops = TORCH_OPS

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]; rotated in
        fp32 and returned in their dtypes, by ``ops`` (the torch ops, or a fused kernel)."""
        return self.ops.rotary(positions, q, k, self.cos, self.sin)

    def rotate_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                         k_out: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate q and k, store the rotated k and v in ``kv_cache`` at ``slot_mapping`` (an fp8
        cache quantized by ``k_scale``, ``v_scale``) and the rotated k in ``k_out`` if given
        (k's shape and dtype); returns the rotated q. With TritonOps this is one kernel per layer."""
        k_cache, v_cache = kv_cache
        return self.ops.rotary_and_cache(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slot_mapping,
                                         k_scale, v_scale, k_out)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                              new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's cached keys.

    q: [num_tokens, num_heads_per_rank, head_dim]; returns the same shape. The cache must
    already hold this step's keys and values; a float8 cache is read back in fp32 times
    ``k_scale``, ``v_scale`` [num_kv_heads_per_rank] (kernels/kv_quant.py). ``new_kv``: this
    step's rotated keys and values [num_tokens, num_kv_heads_per_rank, head_dim], which a GPU
    kernel may read instead of the cache's copy; the reference reads every key from the cache.
    """
    out = torch.empty_like(q)
    is_decode = meta.query_lens_host == 1
    kv_scales = (k_scale, v_scale) if is_fp8_kv(k_cache) else None
    for rows in (np.flatnonzero(is_decode), np.flatnonzero(~is_decode)):
        if len(rows):
            _attend_rows(q, (k_cache, v_cache), kv_scales, meta, torch.from_numpy(rows).to(q.device), scale,
                         sliding_window, out)
    return out


# Scores held at once by the reference path (fp32 elements, 256 MiB): longer queries are attended
# a piece of query tokens at a time, so a 32k-token prompt fits in a CPU's memory.
_MAX_SCORES = 1 << 26


def _attend_rows(q, kv_cache, kv_scales, meta, rows, scale, sliding_window, out) -> None:
    """Attention for the sequences ``rows``, padded to their longest query and context."""
    k_cache, v_cache = kv_cache
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[1]
    starts = meta.query_start_loc[rows].long()
    query_lens = meta.query_start_loc[rows + 1].long() - starts
    max_q = int(meta.query_lens_host[rows.cpu().numpy()].max())
    max_seq = int(meta.seq_lens[rows].max())
    num_blocks = -(-max_seq // block_size)
    tables = meta.block_tables[rows, :num_blocks].long()  # [rows, num_blocks]
    keys = k_cache[tables].view(len(rows), num_blocks * block_size, num_kv_heads, head_dim)
    values = v_cache[tables].view(len(rows), num_blocks * block_size, num_kv_heads, head_dim)
    if kv_scales is not None:
        keys, values = dequantize_kv(keys, kv_scales[0]), dequantize_kv(values, kv_scales[1])

    piece = max(1, _MAX_SCORES // (len(rows) * num_heads * num_blocks * block_size))
    for first in range(0, max_q, piece):
        offsets = torch.arange(first, min(first + piece, max_q), device=q.device)
        valid = offsets[None, :] < query_lens[:, None]  # [rows, piece]
        token = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # [rows, piece]
        num_keys = keys.shape[1]
        if piece < max_q:  # keys past the piece's last position are masked for all of it: skip them
            num_keys = min(num_keys, int(meta.positions[token].max()) + 1)
        _attend_piece(q, keys[:, :num_keys], values[:, :num_keys], meta.positions[token], token, valid,
                      scale, sliding_window, out)


def _attend_piece(q, keys, values, q_pos, token, valid, scale, sliding_window, out) -> None:
    """Causal attention of the query tokens ``token`` [rows, piece] (``valid`` marks real ones) at
    positions ``q_pos`` over ``keys``/``values`` [rows, num_keys, num_kv_heads, head_dim]."""
    num_rows, num_queries = token.shape
    num_kv_heads, head_dim = keys.shape[2], keys.shape[3]
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    q_pad = q[token].view(num_rows, num_queries, num_kv_heads, group, head_dim)
    k_pos = torch.arange(keys.shape[1], device=q.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [rows, piece, num_keys]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    mask &= valid[:, :, None]
    mask[..., 0] |= ~valid  # padding rows see one key, so softmax stays finite

    # [rows, kv_heads, group, piece, num_keys]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_pad.float(), keys.float()) * scale
    scores.masked_fill_(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attended = torch.einsum("bhgqk,bkhd->bqhgd", probs, values.float())  # [rows, piece, kv, g, d]
    attended = attended.reshape(num_rows, num_queries, num_heads, head_dim).to(q.dtype)
    out[token[valid]] = attended[valid]
