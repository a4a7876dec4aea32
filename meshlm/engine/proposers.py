"""The proposer that speculative decoding's ``method`` asks for, built on rank 0."""
from __future__ import annotations

import torch

from meshlm.config import EngineConfig
from meshlm.engine.draft_model_proposer import DraftModelProposer
from meshlm.engine.ngram_proposer import NgramProposer
from meshlm.engine.spec_scheduling import Proposer

__all__ = ["make_proposer"]


def make_proposer(config: EngineConfig, device: torch.device) -> Proposer | None:
    """None without speculative decoding; a draft model loads onto ``device`` (rank 0's)."""
    spec = config.speculative
    if spec is None:
        return None
    if spec.method == "draft_model":
        return DraftModelProposer(spec, config.draft_model, config, device)
    return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
