"""Model families. ``build_model`` picks the family from the config's architecture."""
from __future__ import annotations

import torch

from meshlm.parallel.groups import ParallelGroups
from meshlm.weights.model_config import ModelConfig


def build_model(cfg: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, device, max_positions: int,
                attention_fn):
    if cfg.family == "llama":
        from meshlm.models.llama import LlamaForCausalLM
        return LlamaForCausalLM(cfg, groups, dtype, device, max_positions, attention_fn)
    if cfg.family == "moe":
        from meshlm.models.moe import MoeForCausalLM
        return MoeForCausalLM(cfg, groups, dtype, device, max_positions, attention_fn)
    raise ValueError(f"no model family {cfg.family!r}")
