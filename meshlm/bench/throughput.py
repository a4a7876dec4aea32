"""``meshlm bench throughput``: offline throughput and latency, driving rank 0's coordinator in this
process (greedy, ``ignore_eos``, so every request generates exactly its asked length).

Under ``mpiexec -n N`` (or after the CLI relaunched itself there) every rank calls
``run_throughput``; the ranks other than 0 serve steps inside ``start_runtime`` and exit there.
"""
from __future__ import annotations

import copy
import datetime
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from meshlm.bench.dataset import BenchRequest, Workload
from meshlm.bench.metrics import RequestRecord, latency_samples_ms, summarize
from meshlm.config import EngineArgs
from meshlm.engine.interface import EngineCore
from meshlm.engine.scheduler import SchedulerStats
from meshlm.sampling_params import SamplingParams


@dataclass(slots=True)
class ThroughputOptions:
    workload: Workload = field(default_factory=Workload)
    max_concurrency: int | None = None  # None: every request is submitted at once
    sweep_concurrency: list[int | None] | None = None  # one run per value; None in it: unbounded
    output_json: str | None = None
    plot: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        for c in [self.max_concurrency, *(self.sweep_concurrency or [])]:
            if c is not None and c < 1:
                raise ValueError(f"concurrency {c} must be >= 1 (leave it out for no limit)")
        if self.sweep_concurrency is not None and self.max_concurrency is not None:
            raise ValueError(f"--max-concurrency {self.max_concurrency} and --sweep-concurrency "
                             f"{self.sweep_concurrency} exclude each other: the sweep sets the concurrency")

    @property
    def concurrencies(self) -> list[int | None]:
        return list(self.sweep_concurrency) if self.sweep_concurrency else [self.max_concurrency]


@dataclass(slots=True)
class StepTimes:
    """Where a run's wall time went, step by step: each interval between two returns of ``step()``
    is charged to the steps whose tokens came back in it (the overlapped loop records a step one
    call after launching it, and the call waits for it), as prefill when they ran prompt tokens
    (decodes mixed in) and as decode otherwise. That matches the device's work where launches
    return at once (CUDA); where the launch itself computes the step (the CPU), the overlapped
    loop's intervals are charged one step late."""

    start: SchedulerStats  # the engine's counts when the run began
    end: SchedulerStats  # ... after its last step
    prefill_s: float = 0.0
    decode_s: float = 0.0
    unrecorded_s: float = 0.0  # calls that recorded no step (the first one launches, records nothing)
    num_decode_steps: int = 0
    num_decode_tokens_alone: int = 0  # decode tokens of the decode-only steps

    def add(self, seconds: float, counts: SchedulerStats) -> None:
        before, self.end = self.end, counts
        if counts.num_prefill_tokens > before.num_prefill_tokens:
            self.prefill_s += seconds
        elif counts.num_steps > before.num_steps:
            self.decode_s += seconds
            self.num_decode_steps += counts.num_steps - before.num_steps
            self.num_decode_tokens_alone += counts.num_decode_tokens - before.num_decode_tokens
        else:
            self.unrecorded_s += seconds

    def summary(self) -> dict:
        n = self.num_decode_steps
        return {"num_steps": self.end.num_steps - self.start.num_steps,
                "num_prefill_tokens": self.end.num_prefill_tokens - self.start.num_prefill_tokens,
                "num_decode_tokens": self.end.num_decode_tokens - self.start.num_decode_tokens,
                "num_preemptions": self.end.num_preemptions - self.start.num_preemptions,
                "prefill_step_time_s": self.prefill_s, "decode_step_time_s": self.decode_s,
                "unrecorded_time_s": self.unrecorded_s,
                "num_decode_only_steps": n, "mean_decode_batch": self.num_decode_tokens_alone / n if n else None,
                "mean_decode_step_ms": 1e3 * self.decode_s / n if n else None}


@dataclass(slots=True)
class OfflineRun:
    records: list[RequestRecord]
    peak_kv_cache_usage: float  # the largest fraction of the KV pool in use after a step
    steps: StepTimes


def greedy_params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def run_offline(coordinator: EngineCore, requests: list[BenchRequest], max_concurrency: int | None = None,
                desc: str = "benchmark", show_progress: bool = True) -> OfflineRun:
    """Submit the requests (at most ``max_concurrency`` unfinished at once) and step until all end.

    Every output token is stamped when the step that produced it returns on rank 0.
    """
    from tqdm import tqdm
    peak = 0.0
    records: list[RequestRecord | None] = [None] * len(requests)
    queue, inflight = deque(range(len(requests))), {}  # inflight: request id -> index
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr, disable=not show_progress)

    def admit() -> None:
        while queue and (max_concurrency is None or len(inflight) < max_concurrency):
            i = queue.popleft()
            req = requests[i]
            start = time.perf_counter()
            inflight[coordinator.submit(req.prompt, greedy_params(req.output_len))] = i
            records[i] = RequestRecord(start, num_input_tokens=len(req.prompt))

    admit()
    counts = copy.copy(coordinator.scheduler_stats)  # the engine's own object goes on counting
    steps = StepTimes(counts, counts)
    last = time.perf_counter()
    while inflight:
        outputs = coordinator.step()
        now = time.perf_counter()
        steps.add(now - last, copy.copy(coordinator.scheduler_stats))
        last = now
        peak = max(peak, coordinator.kv_cache_usage)
        for out in outputs:  # deltas: each carries the tokens of this step
            i = inflight.get(out.request_id)
            if i is None:
                continue
            record, num_new = records[i], sum(len(c.token_ids) for c in out.outputs)
            record.token_times += [now] * num_new
            record.num_output_tokens += num_new
            if out.finished:
                record.end = now
                del inflight[out.request_id]
                bar.update(1)
        if inflight and not outputs and not coordinator.has_unfinished():
            raise RuntimeError(f"{len(inflight)} requests were dropped by the coordinator unfinished")
        admit()
    bar.close()
    return OfflineRun(records, peak, steps)


def vocab_size_for_prompts(coordinator) -> int:
    """Random prompt ids come from the tokenizer's vocabulary (and lie inside the model's)."""
    sizes = [coordinator.vocab_size]
    if coordinator.tokenizer is not None:
        sizes.append(coordinator.tokenizer.vocab_size)
    sizes = [s for s in sizes if s]
    if not sizes:
        raise ValueError("neither the model nor the tokenizer says its vocabulary size")
    return min(sizes)


def as_token_ids(coordinator, requests: list[BenchRequest], max_model_len: int | None) -> list[BenchRequest]:
    """Tokenize text prompts once, before timing; check every request fits the context."""
    out = []
    for i, req in enumerate(requests):
        if isinstance(req.prompt, str):
            if coordinator.tokenizer is None:
                raise ValueError(f"request {i} has a text prompt but the tokenizer is off "
                                 "(--skip-tokenizer-init); give token ids")
            ids = coordinator.tokenizer.encode(req.prompt)
            req = BenchRequest(ids, req.output_len, len(ids))
        if max_model_len is not None and len(req.prompt) + req.output_len > max_model_len:
            raise ValueError(f"request {i}: {len(req.prompt)} prompt tokens + {req.output_len} output "
                             f"tokens = {len(req.prompt) + req.output_len} exceed max_model_len="
                             f"{max_model_len}; raise --max-model-len or shorten the requests")
        out.append(req)
    return out


def device_name(args: EngineArgs) -> str:
    import torch
    from meshlm.api.build import pick_device
    local = torch.cuda.current_device() if torch.cuda.is_available() else 0
    device = pick_device(args.device, local)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _config(args: EngineArgs, opts: ThroughputOptions, coordinator, num_prompts: int) -> dict:
    from meshlm import __version__
    from meshlm.weights.default_model import DEFAULT_MODEL_NAME
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    return {
        "backend": "meshlm", "mode": "offline", "model": args.model or DEFAULT_MODEL_NAME,
        "tp": tp, "pp": pp, "ep": args.moe_expert_parallel_size or 1, "num_gpus": args.world_size,
        "device": device_name(args), "dtype": args.dtype, "quantization": args.quantization,
        **opts.workload.describe(num_prompts),
        "max_concurrency": opts.concurrencies[-1], "max_model_len": coordinator.max_model_len,
        "max_num_tokens": coordinator.max_num_tokens, "max_batch_size": coordinator.max_batch_size,
        "block_size": args.block_size, "num_kv_blocks": coordinator.num_kv_blocks,
        "enable_prefix_caching": args.enable_prefix_caching,
        "kv_cache_dtype": args.kv_cache_dtype,
        "meshlm_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def benchmark(coordinator: EngineCore, args: EngineArgs, opts: ThroughputOptions) -> tuple[dict, dict[str, list[float]]]:
    """Warm up, then one measured run per concurrency. Returns the result and the latency samples
    (ms) of its last run, for the plot."""
    vocab = vocab_size_for_prompts(coordinator)
    max_len = coordinator.max_model_len
    requests = as_token_ids(coordinator, opts.workload.requests(vocab), max_len)
    warmup = as_token_ids(coordinator, opts.workload.warmup_requests(requests, vocab), max_len)
    if warmup:
        run_offline(coordinator, warmup, opts.concurrencies[-1], "warm-up", opts.show_progress)
    num_gpus = args.world_size
    points, samples = [], {}
    for c in opts.concurrencies:
        coordinator.reset_prefix_cache()  # each run starts cold: none reuses the prompts of the one before
        desc = "benchmark" if c is None else f"concurrency {c}"
        spec_before = _spec_counts(coordinator)
        run = run_offline(coordinator, requests, c, desc, opts.show_progress)
        spec_decode = _spec_decode_summary(spec_before, _spec_counts(coordinator))
        points.append({"max_concurrency": c, **summarize(run.records, num_gpus),
                       "peak_kv_cache_usage": run.peak_kv_cache_usage, "steps": run.steps.summary(),
                       **({} if spec_decode is None else {"spec_decode": spec_decode})})
        samples = latency_samples_ms(run.records)
    last = {k: v for k, v in points[-1].items() if k != "max_concurrency"}
    result = {"config": _config(args, opts, coordinator, len(requests)), **last,
              "sweep": points if opts.sweep_concurrency else []}
    return result, samples


def _spec_counts(coordinator: EngineCore) -> tuple[int, int, int] | None:
    stats = coordinator.spec_decode_stats
    return None if stats is None else (stats.num_verify_rows, stats.num_draft_tokens, stats.num_accepted_tokens)


def _spec_decode_summary(before: tuple[int, int, int] | None, after: tuple[int, int, int] | None) -> dict | None:
    """Speculative decoding within one measured run (None when it is off)."""
    if before is None or after is None:
        return None
    rows, drafts, accepted = (a - b for a, b in zip(after, before))
    return {"num_drafts": rows, "num_draft_tokens": drafts, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None,
            "mean_acceptance_length": 1 + accepted / rows if rows else None}


def run_throughput(args: EngineArgs, opts: ThroughputOptions) -> dict:
    """Start the runtime, benchmark, shut down; returns the result on rank 0 (other ranks exit)."""
    from meshlm.api.start import start_runtime
    coordinator = start_runtime(args)
    try:
        result, samples = benchmark(coordinator, args, opts)
    finally:
        coordinator.shutdown()
    _write_outputs(result, samples, opts)
    return result


def _write_outputs(result: dict, samples: dict[str, list[float]], opts: ThroughputOptions) -> None:
    from meshlm.bench.report import format_table, write_json
    print(format_table(result, "meshlm bench throughput"), flush=True)
    if opts.output_json:
        write_json(opts.output_json, result)
    if opts.plot:
        from meshlm.bench.plot import plot_result
        config = result["config"]
        title = (f"meshlm offline: {config['model'].rstrip('/').split('/')[-1]}, tp={config['tp']} "
                 f"pp={config['pp']}, {config['device']}, {config['num_prompts']} requests")
        plot_result(opts.plot, samples, result["sweep"] or None, title)
