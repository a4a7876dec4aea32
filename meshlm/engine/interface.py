"""What the API layers use of rank 0's engine, whether it runs in this process (Coordinator) or in
rank 0 of an MPI world this process started (``meshlm.api.remote.RemoteCoordinator``)."""
from __future__ import annotations

from typing import Protocol

from meshlm.engine.outputs import RequestOutput
from meshlm.engine.scheduler import SchedulerStats, SpecDecodeStats
from meshlm.engine.tokenizer import Tokenizer
from meshlm.sampling_params import SamplingParams


class EngineCore(Protocol):
    tokenizer: Tokenizer | None  # None with skip_tokenizer_init
    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    max_batch_size: int  # sequences in one step, resolved
    max_num_tokens: int  # tokens in one step, resolved

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None, prompt_text: str | None = None) -> str:
        """Queue a request and return its id; a bad request raises ValueError, queueing nothing."""

    def abort(self, request_id: str) -> bool:
        """Abort a request, freeing its KV blocks; False when it is unknown or already finished."""

    def step(self) -> list[RequestOutput]:
        """Run one step; the deltas of the requests that progressed."""

    def has_unfinished(self) -> bool:
        """Whether any submitted request is still waiting or running."""

    def has_pending_notices(self) -> bool:
        """Whether the ranks have yet to hear of finished requests (a step with no forward tells them)."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of the KV pool's blocks in use."""

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Speculative decoding's counts so far; None when it is off."""

    @property
    def scheduler_stats(self) -> SchedulerStats:
        """Steps run so far, their prefill and decode tokens, preemptions."""

    def reset_prefix_cache(self) -> None:
        """Forget the cached prefixes (a benchmark's warm-up should not help its measurement)."""

    def shutdown(self) -> None:
        """Stop every rank; later calls do nothing."""
