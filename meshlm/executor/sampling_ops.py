"""The sampler's batched pieces: token counts, penalties, banned tokens, top-k / top-p / min-p
filtering and the exponential race that samples, each one pass over [num_rows, vocab_size]."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["count_tokens", "apply_penalties", "mask_banned_tokens", "apply_top_k_top_p_min_p",
           "exponential_race", "to_device"]


def count_tokens(token_lists: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """How often each token id occurs in each row's list: int32 [num_rows, vocab_size].

    The lists are padded into one [num_rows, max_len] tensor with the id ``vocab_size`` and
    scattered into ``vocab_size + 1`` bins; the padding bin is then dropped.
    """
    num_rows = len(token_lists)
    max_len = max((len(t) for t in token_lists), default=0)
    padded = np.full((num_rows, max_len), vocab_size, dtype=np.int64)  # [num_rows, max_len]
    for row, tokens in enumerate(token_lists):
        padded[row, :len(tokens)] = tokens
    index = to_device(padded, torch.device(device))
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts[:, :vocab_size]  # [num_rows, vocab_size]


def apply_penalties(logits: torch.Tensor, prompt_counts: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """Penalise seen tokens; returns new logits [num_rows, vocab_size].

    Repetition (as HF and vLLM): a token seen in the prompt or the output has its logit divided by
    the penalty when positive and multiplied by it when not. Presence and frequency (as OpenAI and
    vLLM, output tokens only): ``logit -= presence * (count > 0) + frequency * count``.
    The penalty vectors are [num_rows]; the counts [num_rows, vocab_size].
    """
    seen = (prompt_counts > 0) | (output_counts > 0)
    penalty = torch.where(seen, repetition[:, None], torch.ones_like(logits))  # [num_rows, vocab_size]
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    counts = output_counts.to(logits.dtype)
    logits = logits - frequency[:, None] * counts
    return logits - presence[:, None] * (counts > 0).to(logits.dtype)


def mask_banned_tokens(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` with ``-inf`` at each (rows[i], token_ids[i])."""
    logits = logits.clone()
    logits[rows, token_ids] = float("-inf")
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` every logit outside each row's top-k, nucleus and min-p sets (one sort).

    Per row ([num_rows] vectors): ``top_k`` as a float (vocab_size = off), ``top_p`` in (0, 1]
    (1 = off), ``min_p`` in [0, 1] (0 = off). Applied in vLLM's order: top-k, then top-p over the
    renormalised top-k distribution (keep the most likely tokens until their mass reaches top_p),
    then min-p (keep tokens with prob >= min_p * the top prob). The most likely token always stays.
    """
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)  # [num_rows, vocab_size]
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank[None, :] >= top_k[:, None]  # [num_rows, vocab_size], in sorted order
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
    # Rows with top_p == 1 skip the test, so float rounding in the cumsum never drops their tail.
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    drop_unsorted = torch.zeros_like(drop).scatter_(1, sorted_index, drop)  # [num_rows, vocab_size]
    return logits.masked_fill(drop_unsorted, float("-inf"))


def exponential_race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``argmax(probs / q)`` per row with ``q ~ Exp(1)``: an exact draw from ``probs`` with no
    cumulative sum. Returns int64 [num_rows]."""
    noise = noise.clamp(min=torch.finfo(noise.dtype).tiny)  # q == 0 would give 0/0 = nan
    return (probs / noise).argmax(dim=-1)


# --------------------------------------------------------------------------- helpers

def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; on CUDA through pinned memory, without waiting for the copy."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
