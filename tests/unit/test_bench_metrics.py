"""Benchmark statistics on hand-made timelines, token-norm-dist lengths, JSONL parsing, and the
offline loop's concurrency limit on a fake coordinator. Expected values are worked out by hand."""
from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from meshlm.bench.cli_args import parse_concurrency_list
from meshlm.bench.dataset import Workload, load_jsonl, synthetic_requests, token_norm_lengths
from meshlm.bench.metrics import RequestRecord, distribution, summarize
from meshlm.bench.throughput import ThroughputOptions, run_offline
from meshlm.engine.scheduler import SchedulerStats


# --- metrics -------------------------------------------------------------------------------------

def _timeline() -> list[RequestRecord]:
    return [
        # ttft 0.1, e2e 0.6, tpot (0.6 - 0.1) / 2 = 0.25, gaps 0.2 and 0.3
        RequestRecord(0.0, [0.1, 0.3, 0.6], 0.6, num_input_tokens=10, num_output_tokens=3),
        # ttft 0.5, e2e 1.1, tpot (1.1 - 0.5) / 1 = 0.6, gap 0.5
        RequestRecord(0.5, [1.0, 1.5], 1.6, num_input_tokens=20, num_output_tokens=2),
        # failed: counted, excluded from tokens and latencies
        RequestRecord(0.2, [0.3], 0.4, num_input_tokens=7, num_output_tokens=1, error="HTTP 500"),
        # one token: ttft 1.0, e2e 1.0, no tpot, no gap
        RequestRecord(1.0, [2.0], 2.0, num_input_tokens=5, num_output_tokens=1),
    ]


def test_summarize_hand_made_timeline():
    s = summarize(_timeline(), num_gpus=2)
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["duration_s"] == pytest.approx(2.0)  # first start 0.0, last end 2.0
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (35, 6)
    assert s["request_throughput"] == pytest.approx(3 / 2.0)
    assert s["output_throughput"] == pytest.approx(6 / 2.0)
    assert s["total_token_throughput"] == pytest.approx(41 / 2.0)
    assert s["request_throughput_per_gpu"] == pytest.approx(0.75)
    assert s["output_throughput_per_gpu"] == pytest.approx(1.5)
    assert s["total_token_throughput_per_gpu"] == pytest.approx(10.25)
    # numpy's linear interpolation: p at position p/100 * (n - 1) of the sorted samples
    expected = {
        "ttft_ms": (1600 / 3, 500, 500 + 0.8 * 500, 500 + 0.98 * 500),     # [100, 500, 1000]
        "tpot_ms": (425, 425, 250 + 0.9 * 350, 250 + 0.99 * 350),         # [250, 600]
        "itl_ms": (1000 / 3, 300, 300 + 0.8 * 200, 300 + 0.98 * 200),      # [200, 300, 500]
        "e2e_ms": (900, 1000, 1000 + 0.8 * 100, 1000 + 0.98 * 100),        # [600, 1000, 1100]
    }
    for name, (mean, p50, p90, p99) in expected.items():
        got = s[name]
        assert (got["mean"], got["p50"], got["p90"], got["p99"]) == pytest.approx((mean, p50, p90, p99)), name


def test_summarize_without_gpu_count_or_completions():
    records = [RequestRecord(0.0, [], 1.0, error="timed out"), RequestRecord(0.5, [], 2.0, error="refused")]
    s = summarize(records, num_gpus=None)
    assert (s["completed"], s["failed"], s["duration_s"]) == (0, 2, 2.0)
    assert s["request_throughput"] == 0 and s["output_throughput"] == 0
    assert s["output_throughput_per_gpu"] is None
    assert all(s["ttft_ms"][k] is None for k in ("mean", "p50", "p90", "p99"))


def test_distribution_and_record_edge_cases():
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    d = distribution([10.0, 20.0, 30.0, 40.0, 50.0])
    assert (d["mean"], d["p50"], d["p90"], d["p99"]) == pytest.approx((30, 30, 46, 49.6))
    one = RequestRecord(1.0, [1.5], 1.5, num_output_tokens=1)
    assert one.tpot is None and one.itls == [] and one.ttft == pytest.approx(0.5)
    with pytest.raises(ValueError, match="never ended"):
        summarize([RequestRecord(0.0)], num_gpus=1)
    with pytest.raises(ValueError, match="num_gpus=0"):
        summarize(_timeline(), num_gpus=0)


# --- lengths and prompts -------------------------------------------------------------------------

def test_token_norm_lengths_mean_and_stdev():
    lengths = token_norm_lengths(np.random.default_rng(1), 100, 20.0, 200_000)
    assert lengths.dtype.kind == "i" and lengths.min() >= 1
    # Rounding adds the variance of a uniform [-0.5, 0.5): 1/12.
    assert lengths.mean() == pytest.approx(100, abs=0.2)
    assert lengths.std() == pytest.approx(math.sqrt(400 + 1 / 12), abs=0.2)
    assert (token_norm_lengths(np.random.default_rng(0), 7, 0.0, 5) == 7).all()


def test_token_norm_lengths_clipped_to_one():
    lengths = token_norm_lengths(np.random.default_rng(2), 3, 10.0, 100_000)
    assert lengths.min() == 1
    # Every draw below 1.5 becomes 1: P(N(3, 10) < 1.5) = Phi(-0.15).
    expected = 0.5 * (1 + math.erf(-0.15 / math.sqrt(2)))
    assert (lengths == 1).mean() == pytest.approx(expected, abs=0.01)
    with pytest.raises(ValueError, match="stdev=-1"):
        token_norm_lengths(np.random.default_rng(0), 3, -1, 4)


def test_synthetic_requests_token_ids_and_text():
    reqs = synthetic_requests(50, 40, 6, 5.0, 2.0, vocab_size=300, seed=3)
    assert len(reqs) == 50
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.input_len >= 1 for r in reqs)
    assert all(0 <= t < 300 for r in reqs for t in r.prompt)
    assert len({r.input_len for r in reqs}) > 1 and all(r.output_len >= 1 for r in reqs)
    again = synthetic_requests(50, 40, 6, 5.0, 2.0, vocab_size=300, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]
    other = synthetic_requests(50, 40, 6, 5.0, 2.0, vocab_size=300, seed=4)
    assert [r.prompt for r in other] != [r.prompt for r in reqs]
    text = synthetic_requests(4, 12, 3, seed=0)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 12 and r.input_len is None for r in text)


def test_warmup_prompts_differ_from_measured_ones():
    w = Workload(num_prompts=6, input_len=20, output_len=4, warmup=3, seed=5)
    reqs = w.requests(vocab_size=1000)
    warm = w.warmup_requests(reqs, vocab_size=1000)
    assert len(warm) == 3
    assert [len(r.prompt) for r in warm] == [len(r.prompt) for r in reqs[:3]]
    assert all(a.prompt != b.prompt for a, b in zip(warm, reqs))


# --- JSONL ---------------------------------------------------------------------------------------

def _write(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_both_formats(tmp_path):
    path = _write(tmp_path, [json.dumps({"prompt": "hello there", "output_len": 5}), "",
                             json.dumps({"prompt": [1, 2, 3], "max_tokens": 7}),
                             json.dumps({"prompt": "third", "max_tokens": 2})])
    reqs = load_jsonl(path)
    assert [(r.prompt, r.output_len, r.input_len) for r in reqs] == [
        ("hello there", 5, None), ([1, 2, 3], 7, 3), ("third", 2, None)]
    assert len(load_jsonl(path, num_prompts=2)) == 2
    with pytest.raises(ValueError, match=r"holds 3 requests but --num-prompts is 4"):
        load_jsonl(path, num_prompts=4)


@pytest.mark.parametrize("bad, needle", [
    ('{"prompt": "x", "output_len": 3', "not valid JSON"),
    ('{"prompt": "x"}', "output_len"),
    ('{"prompt": "x", "output_len": 0}', "output_len=0"),
    ('{"prompt": 12, "output_len": 3}', "prompt"),
    ('{"prompt": [1, -2], "output_len": 3}', "token ids"),
    ('["prompt", 3]', "JSON object"),
])
def test_jsonl_bad_line_is_named(tmp_path, bad, needle):
    path = _write(tmp_path, [json.dumps({"prompt": "ok", "output_len": 1}), "", bad])
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert f"{path} line 3" in str(err.value) and needle in str(err.value)
    with pytest.raises(ValueError, match="line 3"):  # the CLI's workload checks the file up front
        Workload(dataset=str(path))


def test_workload_and_option_errors():
    with pytest.raises(ValueError, match="input_len=0"):
        Workload(input_len=0)
    with pytest.raises(ValueError, match="warmup=-1"):
        Workload(warmup=-1)
    with pytest.raises(ValueError, match="concurrency 0"):
        ThroughputOptions(max_concurrency=0)
    with pytest.raises(ValueError, match="exclude each other"):
        ThroughputOptions(max_concurrency=2, sweep_concurrency=[1, 2])
    with pytest.raises(FileNotFoundError):
        Workload(dataset="no-such-file.jsonl")
    assert parse_concurrency_list("1,4, 16,inf") == [1, 4, 16, None]
    with pytest.raises(argparse.ArgumentTypeError, match="'x'"):
        parse_concurrency_list("1,x")


# --- the offline loop ----------------------------------------------------------------------------

class FakeCoordinator:
    """Each step gives every running request one token (its first after prefilling its prompt);
    KV usage is running / 10."""

    def __init__(self):
        self.tokenizer = None
        self.running: dict[str, list] = {}
        self.max_running = 0
        self.kv_cache_usage = 0.0
        self.scheduler_stats = SchedulerStats()
        self._n = 0

    def submit(self, prompt, params):
        self._n += 1
        rid = f"r{self._n}"
        self.running[rid] = [params.max_tokens, [], len(prompt)]
        assert params.ignore_eos and params.temperature == 0.0
        return rid

    def has_unfinished(self):
        return bool(self.running)

    def step(self):
        self.max_running = max(self.max_running, len(self.running))
        self.kv_cache_usage = len(self.running) / 10
        outs = []
        stats = self.scheduler_stats
        stats.num_steps += 1
        for rid, (limit, tokens, prompt_len) in list(self.running.items()):
            if tokens:
                stats.num_decode_tokens += 1
            else:
                stats.num_prefill_tokens += prompt_len
            tokens.append(7)
            done = len(tokens) == limit
            outs.append(SimpleNamespace(request_id=rid, finished=done,  # a delta: this step's token
                                        outputs=[SimpleNamespace(token_ids=[7])]))
            if done:
                del self.running[rid]
        return outs


def test_run_offline_respects_concurrency_and_counts_tokens():
    reqs = synthetic_requests(5, 4, 3, vocab_size=50, seed=0)
    coordinator = FakeCoordinator()
    run = run_offline(coordinator, reqs, max_concurrency=2, show_progress=False)
    assert coordinator.max_running == 2
    assert run.peak_kv_cache_usage == pytest.approx(0.2)
    assert all(r.ok and r.num_output_tokens == 3 and len(r.token_times) == 3 for r in run.records)
    assert all(r.num_input_tokens == 4 for r in run.records)
    # 5 requests, 2 at a time, 3 steps each: the last one starts after 2 waves.
    assert min(r.start for r in run.records[4:]) >= max(r.end for r in run.records[:2])
    steps = run.steps.summary()
    assert (steps["num_prefill_tokens"], steps["num_decode_tokens"]) == (5 * 4, 5 * 2)
    assert steps["num_steps"] == coordinator.scheduler_stats.num_steps
    # a step admitting a request is a prefill step; two waves of 2 and the last request alone
    assert steps["num_steps"] - steps["num_decode_only_steps"] in (3, 4, 5)
    unbounded = FakeCoordinator()
    unbounded_run = run_offline(unbounded, reqs, max_concurrency=None, show_progress=False)
    assert unbounded.max_running == 5
    assert unbounded_run.steps.summary()["num_decode_only_steps"] == 2
    assert unbounded_run.steps.summary()["mean_decode_batch"] == 5
