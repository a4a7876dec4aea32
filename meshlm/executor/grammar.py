"""Structured outputs on the sampling rank: one llguidance matcher per constrained request, the
token bitmask it allows next, and the mask applied to the step's logits.

``GrammarCompiler`` holds the tokenizer as llguidance sees it (built once, on the first constrained
request) and an LRU cache of compiled grammars, one per distinct spec; a request's matcher is a
copy of its grammar's fresh matcher. The tokenizer's eos ids are the model's: the grammar allows
them only where it is complete, and after that only them.

The host computes the bitmask ([num_rows, ceil(vocab / 32)] int32, bit ``t % 32`` of word
``t // 32`` set when token ``t`` is allowed) and the device expands it and masks the logits. The
matcher must have consumed the request's previous token first, so a step with a constrained row
waits for the tokens of the steps before it (the sampler's history mechanism).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from meshlm.structured_outputs import StructuredOutputsParams

log = logging.getLogger("meshlm")

__all__ = ["GrammarCompiler", "apply_bitmask", "bitmask_words"]


def bitmask_words(vocab_size: int) -> int:
    """The int32 words of one row's bitmask."""
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Makes matchers for constrained requests; ``tokenizer_path`` is the model's tokenizer.json
    (None: no tokenizer, and a constrained request is an error)."""

    def __init__(self, tokenizer_path: Path | None, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 128):
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._tokenizer = None
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()  # spec key -> fresh matcher
        self.num_compiled = 0  # grammars compiled so far (cache misses)

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance
            from tokenizers import Tokenizer
            if self.tokenizer_path is None or not self.tokenizer_path.is_file():
                raise ValueError(f"structured outputs need the model's tokenizer.json, and there is none "
                                 f"({self.tokenizer_path})")
            tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
            # The larger of the model's rows and the tokenizer's ids: a model may pad its vocabulary,
            # a tokenizer may hold ids past the model's (never allowed: apply_bitmask cuts them off).
            num_ids = max(self.vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
            self._tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=num_ids,
                                                     eos_token=self.eos_token_ids)
        return self._tokenizer

    def matcher(self, spec: StructuredOutputsParams):
        """A new matcher at the start of ``spec``'s grammar."""
        import llguidance
        key = spec.key
        fresh = self._cache.get(key)
        if fresh is None:
            fresh = llguidance.LLMatcher(self._llg_tokenizer(), spec.grammar_text(), log_level=0)
            if fresh.is_error():
                log.warning("structured outputs: the %s grammar does not compile against the tokenizer (%s); "
                            "its requests end at once", spec.kind, fresh.get_error())
            self._cache[key] = fresh
            self.num_compiled += 1
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return fresh.deep_copy()

    def fill_bitmask(self, matchers: Sequence[object]) -> np.ndarray:
        """The next-token bitmask of every matcher: int32 [len(matchers), words] (words cover the
        tokenizer's ids, at least the model's vocabulary)."""
        import llguidance.numpy as llg_numpy
        bitmask = np.full((len(matchers), bitmask_words(self._llg_tokenizer().vocab_size)), -1, dtype=np.int32)
        for row, matcher in enumerate(matchers):
            llg_numpy.fill_next_token_bitmask(matcher, bitmask, row)
        return bitmask


def advance(matcher, token_id: int) -> None:
    """Feed the sampled token to the matcher. A stopped matcher (the grammar is complete, or a step
    already in flight sampled past the request's end) keeps its state: it allows only eos."""
    if matcher.is_stopped():
        return
    if not matcher.consume_token(token_id):
        log.warning("structured outputs: token %d does not match the grammar (%s)", token_id, matcher.get_error())


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """New logits with ``-inf`` wherever ``bitmask`` (int32 [num_masked, words], on the logits'
    device) forbids a token in row ``rows[i]`` (int64 [num_masked]) of ``logits`` [num_rows, vocab]."""
    vocab_size = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool()  # [num_masked, words, 32]
    allowed = allowed.reshape(len(rows), -1)[:, :vocab_size]  # [num_masked, vocab_size]
    masked = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits.index_put((rows,), masked)
