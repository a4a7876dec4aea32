"""A step's sampled tokens on their way from the device to rank 0's bookkeeping.

The sampling rank starts one non-blocking copy of the tokens (and logprobs, when some row asked)
into pinned host memory and records a CUDA event behind it; ``get_result`` waits for that event
only. Meanwhile the host may launch the next step. On the CPU the copy completes at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshlm.protocol import StepResult

__all__ = ["SampledTokens", "AsyncStepResult"]


@dataclass(slots=True)
class SampledTokens:
    """One step's sampler output, still on the sampling device."""

    token_ids: torch.Tensor  # int64 [num_rows]
    logprobs: torch.Tensor | None  # float32 [num_rows]; None if no row asked
    top_token_ids: torch.Tensor | None  # int64 [num_rows, k_max]; None if k_max == 0
    top_logprobs: torch.Tensor | None  # float32 [num_rows, k_max]
    prompt_logprobs: torch.Tensor | None = None  # float32 [num_prompt_rows]; None without prompt rows
    prompt_top_token_ids: torch.Tensor | None = None  # int64 [num_prompt_rows, k_max]
    prompt_top_logprobs: torch.Tensor | None = None  # float32 [num_prompt_rows, k_max]
    # Verify steps (speculative decoding): token_ids is [num_rows, 1 + max_drafts], of which row r
    # holds num_tokens[r] (its accepted drafts, then one sampled token). None: one token a row.
    num_tokens: torch.Tensor | None = None  # int64 [num_rows]


class AsyncStepResult:
    """The host copy of a step's SampledTokens, ready once ``get_result`` returns."""

    def __init__(self, sampled: SampledTokens | None = None, ready: StepResult | None = None):
        """Start copying ``sampled`` to the host, or hold a ``ready`` result (from another rank)."""
        self._ready = ready
        self._host: list[torch.Tensor | None] = []
        self._event = None
        if sampled is None:
            return
        tensors = (sampled.token_ids, sampled.logprobs, sampled.top_token_ids, sampled.top_logprobs,
                   sampled.prompt_logprobs, sampled.prompt_top_token_ids, sampled.prompt_top_logprobs,
                   sampled.num_tokens)
        self._host = [None if t is None else _copy_to_host(t) for t in tensors]
        if sampled.token_ids.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(sampled.token_ids.device))

    def get_result(self) -> StepResult:
        """Blocks until the copy has landed (the step has run); the StepResult on the host."""
        if self._ready is None:
            if self._event is not None:
                self._event.synchronize()
            self._ready = StepResult(*(None if t is None else t.numpy() for t in self._host))
            self._host = []
        return self._ready


def _copy_to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor that receives ``tensor``: a non-blocking copy into pinned memory on CUDA."""
    if tensor.device.type != "cuda":
        return tensor.detach().clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
