"""Per-request timelines and the statistics the field reports over them.

Definitions (those of vLLM's and TensorRT-LLM's benchmarks):
- TTFT: first output token (or first non-empty streamed chunk) minus the request's start.
- ITL: every gap between consecutive output tokens (chunks), pooled over all requests.
- TPOT: per request, ``(e2e - ttft) / (output_tokens - 1)``; requests with one token have none.
- E2E: the request's end minus its start.
- Throughput: completed requests and their tokens over the run's duration, from the first start
  to the last end.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass(slots=True)
class RequestRecord:
    """One request's timeline, in seconds on one monotonic clock."""

    start: float
    token_times: list[float] = field(default_factory=list)  # arrival of each token (or chunk)
    end: float | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None  # None: it completed

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2e(self) -> float:
        assert self.end is not None, "the request has not ended"
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.num_output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return np.diff(self.token_times).tolist() if len(self.token_times) > 1 else []


def distribution(values: list[float]) -> dict[str, float | None]:
    """Mean and percentiles (linear interpolation, numpy's default); None for each when empty."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def latency_samples_ms(records: list[RequestRecord]) -> dict[str, list[float]]:
    """The raw samples behind each latency statistic, in milliseconds, over completed requests."""
    ok = [r for r in records if r.ok]
    return {
        "ttft_ms": [1e3 * r.ttft for r in ok if r.ttft is not None],
        "tpot_ms": [1e3 * r.tpot for r in ok if r.tpot is not None],
        "itl_ms": [1e3 * gap for r in ok for gap in r.itls],
        "e2e_ms": [1e3 * r.e2e for r in ok],
    }


def summarize(records: list[RequestRecord], num_gpus: int | None) -> dict:
    """Counts, throughput (also per GPU when ``num_gpus`` is known) and latency distributions."""
    if not records:
        raise ValueError("no requests to summarize")
    if any(r.end is None for r in records):
        raise ValueError(f"{sum(r.end is None for r in records)} of {len(records)} requests never ended")
    if num_gpus is not None and num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus} must be >= 1")
    ok = [r for r in records if r.ok]
    duration = max(r.end for r in records) - min(r.start for r in records)
    total_in = sum(r.num_input_tokens for r in ok)
    total_out = sum(r.num_output_tokens for r in ok)
    rate = (lambda amount: amount / duration) if duration > 0 else (lambda amount: None)
    throughput = {"request_throughput": rate(len(ok)), "output_throughput": rate(total_out),
                  "total_token_throughput": rate(total_in + total_out)}
    per_gpu = {f"{k}_per_gpu": (v / num_gpus if v is not None and num_gpus else None)
               for k, v in throughput.items()}
    samples = latency_samples_ms(records)
    return {
        "num_requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "duration_s": duration, "total_input_tokens": total_in, "total_output_tokens": total_out,
        **throughput, **per_gpu,
        **{name: distribution(samples[name]) for name in LATENCIES},
    }
