"""Prompt logprobs on the last pipeline stage: how likely each prompt token was, given the ones before.

Only the rows a plan names (``StepPlan.prompt_logprob_index``: tokens of requests that asked for
``prompt_logprobs``) go through the LM head beyond the usual last token of each sequence, so a
step without such requests pays nothing. The rows are scored in slices of ``ROWS_PER_SLICE``: a
slice's full-vocabulary logits are the only large tensor alive, however long the prompt chunk.
As vLLM reports them, the logprobs are the raw ``log_softmax`` of the logits (no temperature,
penalty or bias).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ROWS_PER_SLICE", "score_prompt_tokens"]

ROWS_PER_SLICE = 1024


def score_prompt_tokens(hidden: torch.Tensor, index: torch.Tensor, target_ids: torch.Tensor, k_max: int,
                        logits_of: Callable[[torch.Tensor], torch.Tensor | None]
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """``(logprob of each target [num_rows], top ids [num_rows, k_max], top logprobs)`` on the
    sampling rank, None on the other TP ranks (``k_max == 0``: the top two are None).

    ``hidden`` [num_tokens, hidden_size] is the stage's output, ``index`` [num_rows] picks the
    scored tokens and ``target_ids`` [num_rows] the prompt token that follows each.
    ``logits_of(rows)`` is the collective that turns hidden rows into the sampler's float32
    logits [rows, vocab_size] (None on other ranks); every TP rank calls it on the same slices.
    """
    pieces: list[tuple[torch.Tensor, ...]] = []
    for begin in range(0, len(index), ROWS_PER_SLICE):
        rows = index[begin:begin + ROWS_PER_SLICE]
        logits = logits_of(hidden[rows])  # [slice_rows, vocab_size] on the sampler
        if logits is None:
            continue
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = target_ids[begin:begin + ROWS_PER_SLICE]
        chosen = logprobs.gather(1, targets[:, None])[:, 0]  # [slice_rows]
        if k_max == 0:
            pieces.append((chosen,))
            continue
        top_logprobs, top_ids = logprobs.topk(k_max, dim=-1)  # [slice_rows, k_max]
        pieces.append((chosen, top_ids, top_logprobs))
    if not pieces:
        return None
    if k_max == 0:
        return torch.cat([p[0] for p in pieces]), None, None
    return tuple(torch.cat([p[i] for p in pieces]) for i in range(3))
