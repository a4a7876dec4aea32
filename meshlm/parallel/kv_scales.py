"""One attention layer's FP8 KV-cache scales, sharded with its KV heads.

``k_scale`` and ``v_scale`` are fp32 ``[num_kv_heads_per_rank]`` buffers, 1.0 unless the checkpoint
carries scales (kernels/kv_quant.py says how they are applied). Checkpoint names, as vLLM reads
them, first found wins:

- ``{layer}.self_attn.k_scale`` / ``v_scale``: ModelOpt, Quark and compressed-tensors' KV-cache
  schemes; a scalar or ``[1]`` per tensor, ``[num_kv_heads]`` or ``[num_kv_heads, 1, 1]`` per head;
- ``{layer}.self_attn.k_proj.output_scale`` / ``v_proj.output_scale``: older compressed-tensors;
- ``{layer}.self_attn.kv_scale``: one scale for both (older FP8 checkpoints).

Absent scales are not an error (the pool then stores values as they are, clamped to +-448); a
present one of another size, or not positive and finite, is.
"""
from __future__ import annotations

import torch
from torch import nn

from meshlm.parallel.comm import Communicator
from meshlm.weights.checkpoint import CheckpointError, CheckpointReader


class KVCacheScales(nn.Module):
    """The scales of this rank's KV heads: the same heads QKVParallelLinear gives it (split by tp,
    or one replicated head when tp > num_kv_heads)."""

    def __init__(self, num_kv_heads: int, tp: Communicator, device=None):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.num_kv_heads_per_rank = max(1, num_kv_heads // tp.size)
        replicas = max(1, tp.size // num_kv_heads)  # ranks sharing one KV head
        self.first_head = tp.rank // replicas * self.num_kv_heads_per_rank
        self.register_buffer("k_scale", torch.ones(self.num_kv_heads_per_rank, dtype=torch.float32, device=device))
        self.register_buffer("v_scale", torch.ones(self.num_kv_heads_per_rank, dtype=torch.float32, device=device))

    def expected_shapes(self, prefix: str) -> dict:
        return {}  # optional tensors; their shapes are checked when found

    @torch.no_grad()
    def load(self, reader: CheckpointReader, prefix: str) -> None:
        """Read the scales of ``prefix`` (``model.layers.N``) when the checkpoint has them."""
        attn = f"{prefix}.self_attn"
        for which, buffer in (("k", self.k_scale), ("v", self.v_scale)):
            for name in (f"{attn}.{which}_scale", f"{attn}.{which}_proj.output_scale", f"{attn}.kv_scale"):
                if name in reader:
                    buffer.copy_(self._heads_of(name, reader.read(name)))
                    break

    def _heads_of(self, name: str, scale: torch.Tensor) -> torch.Tensor:
        """This rank's ``[num_kv_heads_per_rank]`` of a per-tensor or per-head checkpoint scale."""
        flat = scale.float().reshape(-1)
        if flat.numel() not in (1, self.num_kv_heads):
            raise CheckpointError(f"KV-cache scale {name!r} has shape {list(scale.shape)} ({flat.numel()} values); "
                                  f"expected one value, or one per KV head (num_kv_heads={self.num_kv_heads})")
        if not bool(torch.isfinite(flat).all() and (flat > 0).all()):
            raise CheckpointError(f"KV-cache scale {name!r} holds {flat.tolist()}; scales must be finite and > 0")
        if flat.numel() == 1:
            return flat.expand(self.num_kv_heads_per_rank)
        return flat[self.first_head:self.first_head + self.num_kv_heads_per_rank]
