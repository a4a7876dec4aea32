"""The flags of ``meshlm bench throughput`` and ``meshlm bench serve``; defaults come from the option
dataclasses, so each is written once."""
from __future__ import annotations

import argparse
import math

from meshlm.bench.dataset import Workload
from meshlm.bench.serve import ServeOptions
from meshlm.bench.throughput import ThroughputOptions


def parse_concurrency_list(text: str) -> list[int | None]:
    """``"1,4,16,inf"`` -> [1, 4, 16, None]; ``inf`` means no limit."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if item in ("inf", "none"):
            values.append(None)
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r} is not an integer or 'inf'") from None
    return values


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    d = Workload()
    group = parser.add_argument_group("workload")
    group.add_argument("--num-prompts", type=int, default=d.num_prompts,
                       help="requests to measure (default: 1000 synthetic, or every line of --dataset)")
    group.add_argument("--input-len", type=int, default=d.input_len, help=f"mean prompt tokens (default: {d.input_len})")
    group.add_argument("--output-len", type=int, default=d.output_len,
                       help=f"mean output tokens (default: {d.output_len})")
    group.add_argument("--input-stdev", type=float, default=d.input_stdev,
                       help="prompt length standard deviation: normal lengths, clipped to >= 1 (default: 0)")
    group.add_argument("--output-stdev", type=float, default=d.output_stdev,
                       help="output length standard deviation (default: 0)")
    group.add_argument("--dataset", default=d.dataset,
                       help='JSONL, one request a line: {"prompt": text or token ids, "output_len": N} '
                            '(or "max_tokens": N)')
    group.add_argument("--warmup", type=int, default=d.warmup,
                       help=f"warm-up requests before measuring (default: {d.warmup})")
    group.add_argument("--seed", type=int, default=d.seed, dest="bench_seed", metavar="SEED",
                       help=f"seed of the random prompts, lengths and arrivals (default: {d.seed})")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-json", default=None, help="write the result here as JSON")
    parser.add_argument("--plot", default=None, help="write the latency plot here (PNG)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _workload(ns: argparse.Namespace) -> Workload:
    return Workload(ns.num_prompts, ns.input_len, ns.output_len, ns.input_stdev, ns.output_stdev,
                    ns.dataset, ns.warmup, ns.bench_seed)


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    _add_workload_args(parser)
    parser.add_argument("--max-concurrency", type=int, default=ThroughputOptions().max_concurrency,
                        help="at most this many requests unfinished at once (default: all submitted at once)")
    parser.add_argument("--sweep-concurrency", type=parse_concurrency_list, default=None,
                        help="one run per concurrency, e.g. 1,4,16,inf; the result's top level is the last")
    _add_output_args(parser)


def throughput_options(ns: argparse.Namespace) -> ThroughputOptions:
    return ThroughputOptions(_workload(ns), ns.max_concurrency, ns.sweep_concurrency, ns.output_json,
                             ns.plot, not ns.no_progress)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    d = ServeOptions()
    parser.add_argument("--base-url", default=d.base_url, help=f"the server (default: {d.base_url})")
    parser.add_argument("--endpoint", default=d.endpoint,
                        help=f"{d.endpoint} or /v1/chat/completions (default: {d.endpoint})")
    parser.add_argument("--model", default=d.model, help="model name to send (default: the server's first)")
    _add_workload_args(parser)
    parser.add_argument("--concurrency", "--max-concurrency", type=int, default=d.concurrency, dest="concurrency",
                        help="at most this many requests in flight (default: no limit)")
    parser.add_argument("--request-rate", type=float, default=d.request_rate,
                        help="Poisson arrivals, requests/s (default: inf, all at once)")
    parser.add_argument("--api-key", default=d.api_key, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--num-gpus", type=int, default=d.num_gpus,
                        help="GPUs behind the server, for per-GPU throughput (default: not reported)")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                        help=f"seconds one request may take before it counts as failed "
                             f"(default: {d.request_timeout_s:g})")
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size,
                        help="send synthetic prompts as random token ids below this (exact input "
                             "lengths; the server must take token-id prompts) instead of text")
    _add_output_args(parser)


def serve_options(ns: argparse.Namespace) -> ServeOptions:
    rate = ns.request_rate if ns.request_rate is not None else math.inf
    return ServeOptions(ns.base_url, ns.endpoint, ns.model, _workload(ns), ns.concurrency, rate,
                        ns.api_key, ns.num_gpus, ns.request_timeout, ns.vocab_size, ns.output_json,
                        ns.plot, not ns.no_progress)
