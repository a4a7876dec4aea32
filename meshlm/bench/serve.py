"""``meshlm bench serve``: an asyncio load generator for any OpenAI-compatible server (meshlm's own,
vLLM, ...), streaming each completion over SSE with httpx.

Requests arrive all at once or as a Poisson process (``request_rate``), at most ``concurrency`` in
flight. Every request has a timeout, and a failed one is counted and reported, never fatal, so a run
always ends by itself.
"""
from __future__ import annotations

import asyncio
import collections
import datetime
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from meshlm.bench.dataset import BenchRequest, Workload
from meshlm.bench.metrics import RequestRecord, latency_samples_ms, summarize

_MAX_REPORTED_ERRORS = 10


@dataclass(slots=True)
class ServeOptions:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model the server lists at /v1/models
    workload: Workload = field(default_factory=Workload)
    concurrency: int | None = None  # None: no limit
    request_rate: float = math.inf  # requests/s of a Poisson process; inf: all at once
    api_key: str | None = None
    num_gpus: int | None = None  # the server's GPU count, for per-GPU throughput; None: not reported
    request_timeout_s: float = 600.0
    vocab_size: int | None = None  # set: synthetic prompts are random token ids below it, not text
    output_json: str | None = None
    plot: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1 (leave it out for no limit)")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate={self.request_rate} must be > 0 (inf: all at once)")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s} must be > 0")
        if self.num_gpus is not None and self.num_gpus < 1:
            raise ValueError(f"num_gpus={self.num_gpus} must be >= 1")
        if not self.endpoint.startswith("/"):
            raise ValueError(f"endpoint={self.endpoint!r} must start with '/', e.g. /v1/completions")

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


class RequestFailed(Exception):
    """The server answered, but not with a usable stream."""


def request_body(opts: ServeOptions, model: str, req: BenchRequest) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if opts.is_chat:
        if not isinstance(req.prompt, str):
            raise ValueError(f"{opts.endpoint} takes text messages; token-id prompts need /v1/completions")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


async def _stream_one(client, opts: ServeOptions, body: dict, record: RequestRecord) -> None:
    """Send one request and stamp every non-empty chunk; token counts come from the usage chunk."""
    num_chunks, usage = 0, None
    async with client.stream("POST", opts.endpoint, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise RequestFailed(f"HTTP {response.status_code}: {text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments, event names
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                raise RequestFailed(f"a stream chunk is not JSON: {data[:100]!r}") from None
            if chunk.get("error"):
                raise RequestFailed(f"the server sent an error: {str(chunk['error'])[:200]}")
            if _chunk_text(chunk):
                record.token_times.append(time.perf_counter())
                num_chunks += 1
            usage = chunk.get("usage") or usage
    if usage and usage.get("prompt_tokens") is not None:
        record.num_input_tokens = int(usage["prompt_tokens"])
    record.num_output_tokens = int(usage["completion_tokens"]) if usage and usage.get(
        "completion_tokens") is not None else num_chunks
    if not record.token_times:
        raise RequestFailed("the stream ended without any generated text")


async def send_request(client, opts: ServeOptions, model: str, req: BenchRequest) -> RequestRecord:
    record = RequestRecord(time.perf_counter(), num_input_tokens=req.approx_input_len)
    try:
        await asyncio.wait_for(_stream_one(client, opts, request_body(opts, model, req), record),
                               opts.request_timeout_s)
    except asyncio.TimeoutError:
        record.error = f"timed out after {opts.request_timeout_s:g} s"
    except RequestFailed as exc:
        record.error = str(exc)
    except Exception as exc:  # connection refused, reset, protocol errors: count, keep going
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.perf_counter()
    return record


async def run_requests(client, opts: ServeOptions, model: str, requests: list[BenchRequest],
                       desc: str) -> list[RequestRecord]:
    """Send every request, paced by the Poisson arrivals and limited to ``concurrency`` in flight."""
    from tqdm import tqdm
    limit = asyncio.Semaphore(opts.concurrency) if opts.concurrency else None
    rng = np.random.default_rng(opts.workload.seed)
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not opts.show_progress)

    async def one(req: BenchRequest) -> RequestRecord:
        if limit is None:
            record = await send_request(client, opts, model, req)
        else:
            async with limit:
                record = await send_request(client, opts, model, req)
        bar.update(1)
        return record

    tasks = []
    for i, req in enumerate(requests):
        if i > 0 and math.isfinite(opts.request_rate):
            await asyncio.sleep(float(rng.exponential(1.0 / opts.request_rate)))
        tasks.append(asyncio.create_task(one(req)))
    records = await asyncio.gather(*tasks)
    bar.close()
    return list(records)


async def fetch_model_name(client, base_url: str) -> str:
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except Exception as exc:
        raise ValueError(f"could not read the model name from {base_url}/v1/models ({type(exc).__name__}: "
                         f"{exc}); is the server up? Name the model with --model") from None


def _error_summary(records: list[RequestRecord]) -> list[dict]:
    counts = collections.Counter(r.error for r in records if r.error is not None)
    return [{"error": e, "count": n} for e, n in counts.most_common(_MAX_REPORTED_ERRORS)]


def _prompt_format(requests: list[BenchRequest]) -> str:
    kinds = {"text" if isinstance(r.prompt, str) else "token_ids" for r in requests}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def _config(opts: ServeOptions, model: str, requests: list[BenchRequest]) -> dict:
    from meshlm import __version__
    return {
        "backend": "openai-chat" if opts.is_chat else "openai-completions", "mode": "serve",
        "base_url": opts.base_url, "endpoint": opts.endpoint, "model": model, "num_gpus": opts.num_gpus,
        **opts.workload.describe(len(requests)), "prompt_format": _prompt_format(requests),
        "max_concurrency": opts.concurrency,
        "request_rate": opts.request_rate if math.isfinite(opts.request_rate) else None,
        "request_timeout_s": opts.request_timeout_s, "meshlm_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


async def benchmark_server(opts: ServeOptions) -> tuple[dict, dict[str, list[float]]]:
    """Warm up, then the measured run. Returns the result and its latency samples (ms)."""
    import httpx
    requests = opts.workload.requests(opts.vocab_size)
    warmup = opts.workload.warmup_requests(requests, opts.vocab_size)
    if opts.is_chat and not all(isinstance(r.prompt, str) for r in requests):
        raise ValueError(f"{opts.endpoint} takes text messages; token-id prompts (--vocab-size or a "
                         "dataset of ids) need /v1/completions")
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    connections = opts.concurrency or len(requests)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=opts.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(opts.request_timeout_s)) as client:
        model = opts.model or await fetch_model_name(client, opts.base_url)
        if warmup:
            await run_requests(client, opts, model, warmup, "warm-up")
        records = await run_requests(client, opts, model, requests, "benchmark")
    result = {"config": _config(opts, model, requests), **summarize(records, opts.num_gpus),
              "peak_kv_cache_usage": None, "errors": _error_summary(records)}
    return result, latency_samples_ms(records)


def run_serve_benchmark(opts: ServeOptions) -> dict:
    """Run the load, print the table, write the JSON and the plot; returns the result."""
    from meshlm.bench.report import format_table, write_json
    result, samples = asyncio.run(benchmark_server(opts))
    print(format_table(result, "meshlm bench serve"), flush=True)
    if opts.output_json:
        write_json(opts.output_json, result)
    if opts.plot:
        from meshlm.bench.plot import plot_result
        config = result["config"]
        plot_result(opts.plot, samples, None, f"{config['model']} at {config['base_url']}, "
                    f"{config['num_prompts']} requests")
    return result
