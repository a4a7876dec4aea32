"""Prometheus metrics of the server, with vLLM's names under the ``meshlm:`` prefix.

Gauges (running and waiting requests, KV cache usage) are read from the engine at each scrape;
latencies and token counts are recorded per request when it ends. Each app has its own registry,
so several apps can live in one process (tests).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshlm.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class SpecDecodeMetrics:
    """Speculative decoding (vLLM's names): counters of verify rows ("drafts"), draft tokens and
    accepted draft tokens, and gauges of the acceptance rate and of the mean tokens one verify row
    emits (accepted drafts + 1). The engine keeps totals; each scrape adds what is new."""

    def __init__(self, counter, gauge):
        self.num_drafts = counter("meshlm:spec_decode_num_drafts", "Sequence steps that verified draft tokens")
        self.num_draft_tokens = counter("meshlm:spec_decode_num_draft_tokens", "Draft tokens verified")
        self.num_accepted_tokens = counter("meshlm:spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.acceptance_rate = gauge("meshlm:spec_decode_acceptance_rate",
                                     "Accepted draft tokens / verified draft tokens, since the start")
        self.mean_acceptance_length = gauge("meshlm:spec_decode_mean_acceptance_length",
                                            "Tokens emitted per verify step of a sequence (accepted + 1)")
        self._seen = (0, 0, 0)

    def update(self, stats) -> None:
        totals = (stats.num_verify_rows, stats.num_draft_tokens, stats.num_accepted_tokens)
        for metric, total, seen in zip((self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens),
                                       totals, self._seen):
            metric.inc(total - seen)
        self._seen = totals
        self.acceptance_rate.set(stats.acceptance_rate)
        self.mean_acceptance_length.set(stats.mean_tokens_per_verify_row)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        self.num_running = gauge("meshlm:num_requests_running", "Sequences being generated")
        self.num_waiting = gauge("meshlm:num_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_cache_usage = gauge("meshlm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)")
        self.ttft = histogram("meshlm:time_to_first_token_seconds", "Time to the first token", _TTFT_BUCKETS)
        self.tpot = histogram("meshlm:time_per_output_token_seconds",
                              "Time per output token after the first, per request", _TPOT_BUCKETS)
        self.e2e = histogram("meshlm:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             _E2E_BUCKETS)
        self.prompt_tokens = counter("meshlm:prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("meshlm:generation_tokens", "Tokens generated")
        self.spec_decode = SpecDecodeMetrics(counter, gauge)
        self._finished = Counter("meshlm:request_success", "Requests finished, by finish reason",
                                 labels + ["finished_reason"], registry=self.registry)

    def render(self, stats: dict) -> bytes:
        """The text exposition, with the gauges set from ``engine.stats()``."""
        self.num_running.set(stats["num_running"])
        self.num_waiting.set(stats["num_waiting"])
        self.kv_cache_usage.set(stats["kv_cache_usage"])
        if stats.get("spec_decode") is not None:
            self.spec_decode.update(stats["spec_decode"])
        return generate_latest(self.registry)

    def record(self, last: RequestOutput, arrival: float, first_token: float | None) -> None:
        """One request ended (finished or aborted); ``last`` is its last output."""
        now = time.monotonic()
        self.prompt_tokens.inc(len(last.prompt_token_ids))
        num_generated = [len(c.token_ids) for c in last.outputs]
        self.generation_tokens.inc(sum(num_generated))
        if not last.finished:
            self._finished.labels(self.model_name, "abort").inc()
            return
        for c in last.outputs:
            self._finished.labels(self.model_name, c.finish_reason).inc()
        self.e2e.observe(now - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            longest = max(num_generated)
            if longest > 1:
                self.tpot.observe((now - first_token) / (longest - 1))
