"""A benchmark result as a text table (stdout) and as a JSON file."""
from __future__ import annotations

import json
from pathlib import Path

from meshlm.bench.metrics import LATENCIES, PERCENTILES

_LATENCY_NAMES = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "itl_ms": "ITL", "e2e_ms": "E2E"}


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _throughput_lines(result: dict) -> list[str]:
    lines = []
    for key, label in (("request_throughput", "Request throughput (req/s)"),
                       ("output_throughput", "Output token throughput (tok/s)"),
                       ("total_token_throughput", "Total token throughput (tok/s)")):
        per_gpu = result.get(f"{key}_per_gpu")
        suffix = f"   ({_num(per_gpu)} per GPU)" if per_gpu is not None else ""
        lines.append(f"{label:<34}{_num(result[key]):>12}{suffix}")
    return lines


def _latency_lines(result: dict) -> list[str]:
    header = f"{'Latency (ms)':<14}{'mean':>11}" + "".join(f"{'p' + str(p):>11}" for p in PERCENTILES)
    lines = [header]
    for name in LATENCIES:
        stats = result[name]
        lines.append(f"{_LATENCY_NAMES[name]:<14}{_num(stats['mean']):>11}"
                     + "".join(f"{_num(stats[f'p{p}']):>11}" for p in PERCENTILES))
    return lines


def _sweep_lines(sweep: list[dict]) -> list[str]:
    lines = [f"{'concurrency':>12}{'req/s':>10}{'out tok/s':>12}{'TTFT p50':>11}{'TPOT p50':>11}{'E2E p50':>11}"]
    for point in sweep:
        c = point["max_concurrency"]
        lines.append(f"{'inf' if c is None else c:>12}{_num(point['request_throughput']):>10}"
                     f"{_num(point['output_throughput'], '.1f'):>12}{_num(point['ttft_ms']['p50']):>11}"
                     f"{_num(point['tpot_ms']['p50']):>11}{_num(point['e2e_ms']['p50']):>11}")
    return lines


def format_table(result: dict, title: str) -> str:
    """The summary a person reads: config, counts, throughput, latency percentiles, sweep."""
    config = result["config"]
    rule = "=" * 70
    lines = [rule, title, rule]
    for key in ("model", "device", "base_url", "num_gpus", "tp", "pp", "ep", "num_prompts", "input_len",
                "output_len", "dataset", "max_concurrency", "request_rate"):
        if key in config and config[key] is not None:
            lines.append(f"{key:<34}{config[key]!s:>12}")
    lines.append(f"{'Completed / failed requests':<34}{result['completed']:>6} / {result['failed']:<4}")
    lines.append(f"{'Duration (s)':<34}{_num(result['duration_s']):>12}")
    lines.append(f"{'Total input / output tokens':<34}{result['total_input_tokens']:>6} / "
                 f"{result['total_output_tokens']}")
    lines += _throughput_lines(result)
    if result.get("peak_kv_cache_usage") is not None:
        lines.append(f"{'Peak KV cache usage':<34}{100 * result['peak_kv_cache_usage']:>11.1f}%")
    steps = result.get("steps")
    if steps is not None:
        lines.append(f"{'Steps / preemptions':<34}{steps['num_steps']:>6} / {steps['num_preemptions']}")
        lines.append(f"{'Time in prefill / decode steps (s)':<34}{_num(steps['prefill_step_time_s']):>12}"
                     f" / {_num(steps['decode_step_time_s'])}   ({_num(steps['unrecorded_time_s'])} in calls"
                     " that recorded no step)")
        lines.append(f"{'Decode-only steps: batch, ms':<34}{_num(steps['mean_decode_batch']):>12}"
                     f" / {_num(steps['mean_decode_step_ms'])}")
    spec = result.get("spec_decode")
    if spec is not None:
        lines.append(f"{'Spec decode acceptance rate':<34}{_num(spec['acceptance_rate']):>12}")
        lines.append(f"{'Spec decode tokens per step':<34}{_num(spec['mean_acceptance_length']):>12}"
                     f"   ({spec['num_accepted_tokens']} of {spec['num_draft_tokens']} drafts accepted)")
    lines.append("-" * 70)
    lines += _latency_lines(result)
    if result.get("sweep"):
        lines += ["-" * 70] + _sweep_lines(result["sweep"])
    for error in result.get("errors") or []:
        lines.append(f"failed {error['count']}x: {error['error']}")
    lines.append(rule)
    return "\n".join(lines)


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
