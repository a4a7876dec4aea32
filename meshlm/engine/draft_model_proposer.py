"""Draft tokens from a smaller model of the same vocabulary (draft-model speculation), on rank 0.

The draft runs unsharded on rank 0's device with a KV pool for one sequence. Its drafts are greedy:
a deterministic proposer, which is what the verifier's rejection rule assumes, so the target's greedy
output and sampled distribution never depend on the draft. The pool keeps the KV of the last
sequence drafted for; the next call recomputes only past the prefix it shares with that sequence
(at batch 1, the accepted tokens and the new one).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meshlm.config import EngineConfig, SpeculativeConfig
from meshlm.executor.model_runner import resolve_dtype, select_attention
from meshlm.kernels.attention import AttentionMetadata
from meshlm.kernels.fused_ops import select_ops
from meshlm.models import build_model
from meshlm.parallel.groups import ParallelGroups
from meshlm.weights.checkpoint import CheckpointReader
from meshlm.weights.model_config import ModelConfig

__all__ = ["DraftModelProposer"]


class DraftModelProposer:
    def __init__(self, spec: SpeculativeConfig, draft: ModelConfig, config: EngineConfig, device: torch.device):
        self.num_speculative_tokens = spec.num_speculative_tokens
        self.vocab_size = draft.vocab_size
        self.max_model_len = config.max_model_len
        self.device = device
        dtype = resolve_dtype(config.dtype, draft.torch_dtype, device)
        self.model = build_model(draft, ParallelGroups.single(), dtype, device, self.max_model_len,
                                 select_attention(config.attention_backend, device))
        self.model.use_ops(select_ops(config.enable_fused_kernels, device))
        self.model.eval()
        with torch.no_grad():
            self.model.load(CheckpointReader(Path(spec.model)))
        # One sequence's pool: block i holds positions [i * block_size, (i + 1) * block_size), so a
        # token's slot is its position.
        block_size = config.cache.block_size
        num_blocks = -(-self.max_model_len // block_size)
        self.kv_caches = [tuple(torch.zeros((num_blocks, block_size, attn.num_kv_heads_per_rank, attn.head_dim),
                                            dtype=dtype, device=device) for _ in range(2))
                          for attn in self.model.attention_layers]
        self.block_tables = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]  # [1, num_blocks]
        self.cached_token_ids: list[int] = []  # the tokens whose KV the pool holds, from position 0

    @torch.inference_mode()
    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        """Up to ``min(num_speculative_tokens, max_drafts)`` greedy tokens of the draft after ``token_ids``."""
        # The last draft's KV is never written: positions up to len + num_drafts - 2 must fit the pool.
        num_drafts = min(self.num_speculative_tokens, max_drafts, self.max_model_len + 1 - len(token_ids))
        if num_drafts < 1 or not token_ids:
            return []
        num_reused = _common_prefix_len(self.cached_token_ids, token_ids, len(token_ids) - 1)
        self.cached_token_ids = token_ids[:num_reused]
        new_token_ids = token_ids[num_reused:]
        drafts = []
        for _ in range(num_drafts):
            logits = self._forward(new_token_ids)  # [vocab_size] after the last new token
            self.cached_token_ids = self.cached_token_ids + new_token_ids
            new_token_ids = [int(torch.argmax(logits))]
            drafts.append(new_token_ids[0])
        return drafts

    def _forward(self, token_ids: list[int]) -> torch.Tensor:
        """Write the KV of ``token_ids`` after the cached tokens; the logits after the last one."""
        start, num_tokens = len(self.cached_token_ids), len(token_ids)
        end = start + num_tokens
        positions = torch.arange(start, end, dtype=torch.int64, device=self.device)  # [num_tokens]
        meta = AttentionMetadata(
            positions=positions, slot_mapping=positions,
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=self.device),
            block_tables=self.block_tables, max_query_len=num_tokens, max_seq_len=end,
            query_lens_host=np.array([num_tokens], dtype=np.int32))
        input_ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        hidden = self.model(self.model.embed(input_ids), meta, self.kv_caches)  # [num_tokens, hidden_size]
        return self.model.compute_logits(hidden[-1:])[0, :self.vocab_size]


def _common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n = min(len(a), len(b), limit)
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if len(mismatch) else n
