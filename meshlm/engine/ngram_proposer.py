"""Draft tokens by prompt lookup (n-gram speculation), on rank 0.

The drafts for a sequence continue the latest earlier occurrence of its last ``n`` tokens, for the
longest ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min`` that occurs: text that
quotes, edits or summarises its prompt repeats spans of it, and those spans are drafted for free.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["NgramProposer"]


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.num_speculative_tokens = num_speculative_tokens
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        """Up to ``min(num_speculative_tokens, max_drafts)`` tokens that may follow ``token_ids``;
        empty when no n-gram of the allowed lengths recurs."""
        num_drafts = min(self.num_speculative_tokens, max_drafts)
        if num_drafts < 1 or len(token_ids) < self.prompt_lookup_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.prompt_lookup_max, len(tokens) - 1), self.prompt_lookup_min - 1, -1):
            # [len - n, n]: every window that ends before the last token, so a continuation follows it
            windows = sliding_window_view(tokens[:-1], n)
            matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(matches):
                start = int(matches[-1]) + n  # the latest occurrence: the nearest context
                return tokens[start:start + num_drafts].tolist()
        return []
