"""The per-request limits on which tokens may come next, applied to one step's logits, batched
over rows: ``allowed_token_ids`` (every other token ``-inf``), ``bad_words`` (a word's last token
``-inf`` when the tokens before it end the output so far) and ``logit_bias`` (added).

The host only gathers (row, token id) pairs, a few per request; the masks and the additions are
single indexed writes on the device. The coordinator refuses ids outside the vocabulary.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from meshlm.sampling_params import SamplingParams

__all__ = ["apply_token_constraints", "banned_word_tokens"]


def apply_token_constraints(logits: torch.Tensor, params: Sequence[SamplingParams],
                            outputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """New logits [num_rows, vocab_size] under each row's allowed ids, bad words and logit bias;
    ``outputs[row]`` is the row's output tokens so far (read only for rows with bad words)."""
    vocab_size = logits.shape[-1]
    if any(p.allowed_token_ids is not None for p in params):
        rows, cols = _pairs([(row, p.allowed_token_ids) for row, p in enumerate(params)
                             if p.allowed_token_ids is not None], vocab_size)
        restricted = [row for row, p in enumerate(params) if p.allowed_token_ids is not None]
        banned = torch.zeros_like(logits, dtype=torch.bool)  # [num_rows, vocab_size]
        banned[_index(restricted, logits.device)] = True
        banned[_index(rows, logits.device), _index(cols, logits.device)] = False
        logits = logits.masked_fill(banned, float("-inf"))
    if any(p.bad_words_token_ids for p in params):
        rows, cols = _pairs([(row, banned_word_tokens(p.bad_words_token_ids, outputs[row]))
                             for row, p in enumerate(params) if p.bad_words_token_ids], vocab_size)
        logits = logits.clone()
        logits[_index(rows, logits.device), _index(cols, logits.device)] = float("-inf")
    if any(p.logit_bias for p in params):
        rows, cols = _pairs([(row, list(p.logit_bias)) for row, p in enumerate(params)], vocab_size)
        biases = [b for p in params for t, b in p.logit_bias.items() if t < vocab_size]
        bias = torch.tensor(biases, dtype=logits.dtype).to(logits.device)
        logits = logits.index_put((_index(rows, logits.device), _index(cols, logits.device)), bias,
                                  accumulate=True)
    return logits


def banned_word_tokens(words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The last token of every word whose earlier tokens end ``output`` (a one-token word: always)."""
    banned = []
    for word in words:
        num_before = len(word) - 1
        if num_before == 0 or (len(output) >= num_before and list(output[-num_before:]) == list(word[:-1])):
            banned.append(word[-1])
    return banned


def _pairs(row_ids: list[tuple[int, Sequence[int]]], vocab_size: int) -> tuple[list[int], list[int]]:
    """The (row, token id) pairs as two flat lists, ids outside the vocabulary left out."""
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in row_ids:
        kept = [t for t in ids if t < vocab_size]
        rows.extend([row] * len(kept))
        cols.extend(kept)
    return rows, cols


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(values, dtype=np.int64))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor
