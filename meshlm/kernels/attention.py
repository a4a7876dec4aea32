"""Attention over the paged KV cache: metadata, rotary embeddings, and the reference path.

The KV cache of one layer on one rank is ``[num_blocks, block_size, num_kv_heads_per_rank,
head_dim]``; token ``i`` of a sequence lives in block ``block_table[i // block_size]`` at
offset ``i % block_size`` ("slot" = block * block_size + offset).

The reference path is plain torch, works on packed variable-length batches without a loop over
sequences (decode rows and prefill rows are two padded batches), and is what the GPU kernels
are checked against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from meshlm.kernels.fused_ops import TORCH_OPS
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
    """Rotate-half rotary embedding (Hugging Face layout) with optional llama3 / linear scaling."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict | None, device: torch.device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _scale_inv_freq(inv_freq, scaling)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [max_positions, head_dim / 2]
        self.cos = freqs.cos().to(device)  # [max_positions, head_dim / 2] fp32
        self.sin = freqs.sin().to(device)
        self.ops = TORCH_OPS

    def __call__(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [num_tokens, num_heads, head_dim], k: [num_tokens, num_kv_heads, head_dim]; rotated in
        fp32 and returned in their dtypes, by ``ops`` (the torch ops, or a fused kernel)."""
        return self.ops.rotary(positions, q, k, self.cos, self.sin)

    def rotate_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: tuple[torch.Tensor, torch.Tensor], slot_mapping: torch.Tensor,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate q and k, store the rotated k and v in ``kv_cache`` at ``slot_mapping`` (an fp8
        cache quantized by ``k_scale``, ``v_scale``); returns the rotated q. With TritonOps this is
        one kernel per layer."""
        k_cache, v_cache = kv_cache
        return self.ops.rotary_and_cache(positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slot_mapping,
                                         k_scale, v_scale)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over each sequence's cached keys.

    q: [num_tokens, num_heads_per_rank, head_dim]; returns the same shape. The cache must
    already hold this step's keys and values; a float8 cache is read back in fp32 times
    ``k_scale``, ``v_scale`` [num_kv_heads_per_rank] (kernels/kv_quant.py).
    """
    out = torch.empty_like(q)
    is_decode = meta.query_lens_host == 1
    kv_scales = (k_scale, v_scale) if is_fp8_kv(k_cache) else None
    for rows in (np.flatnonzero(is_decode), np.flatnonzero(~is_decode)):
        if len(rows):
            _attend_rows(q, (k_cache, v_cache), kv_scales, meta, torch.from_numpy(rows).to(q.device), scale,
                         sliding_window, out)
    return out


def _attend_rows(q, kv_cache, kv_scales, meta, rows, scale, sliding_window, out) -> None:
    """Attention for the sequences ``rows``, padded to their longest query and context."""
    k_cache, v_cache = kv_cache
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    starts = meta.query_start_loc[rows].long()
    query_lens = meta.query_start_loc[rows + 1].long() - starts
    max_q = int(meta.query_lens_host[rows.cpu().numpy()].max())
    max_seq = int(meta.seq_lens[rows].max())
    num_blocks = -(-max_seq // block_size)

    offsets = torch.arange(max_q, device=q.device)
    valid = offsets[None, :] < query_lens[:, None]  # [rows, max_q]
    token = torch.where(valid, starts[:, None] + offsets[None, :], 0)  # [rows, max_q]
    q_pad = q[token].view(len(rows), max_q, num_kv_heads, group, head_dim)
    tables = meta.block_tables[rows, :num_blocks].long()  # [rows, num_blocks]
    keys = k_cache[tables].view(len(rows), num_blocks * block_size, num_kv_heads, head_dim)
    values = v_cache[tables].view(len(rows), num_blocks * block_size, num_kv_heads, head_dim)
    if kv_scales is not None:
        keys, values = dequantize_kv(keys, kv_scales[0]), dequantize_kv(values, kv_scales[1])

    q_pos = meta.positions[token]  # [rows, max_q]
    k_pos = torch.arange(num_blocks * block_size, device=q.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [rows, max_q, ctx]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    mask &= valid[:, :, None]
    mask[..., 0] |= ~valid  # padding rows see one key, so softmax stays finite

    # [rows, kv_heads, group, max_q, ctx]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_pad.float(), keys.float()) * scale
    scores.masked_fill_(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attended = torch.einsum("bhgqk,bkhd->bqhgd", probs, values.float())  # [rows, max_q, kv, g, d]
    attended = attended.reshape(len(rows), max_q, num_heads, head_dim).to(q.dtype)
    out[token[valid]] = attended[valid]
