"""Rank 0's host work per step, without a model: how large a decode batch the host can feed.

The coordinator schedules, builds the plan and records the tokens of every step in Python; with
the overlapped loop this runs while the device computes the step before, so a step takes the
longer of the two. Here the dispatcher answers at once with fixed tokens, so the time measured is
the host's alone: scheduling, the plan, recording the tokens, the outputs and the benchmark loop
of ``meshlm bench throughput`` (``run_offline``), split by part. Runs on any machine (no GPU).

    python benchmarks/host_overhead.py --num-prompts 2000 --input-len 128 --output-len 128

The scheduler decides from sizes alone, so with the pool of a GPU run (``--num-kv-blocks``, the
run's log prints it) and its ``--capacity-scheduler-policy`` this replays that run's schedule:
the same steps, preemptions and decode batches as ``meshlm bench throughput`` reports, and how
many sequences ran at each point of the run.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from meshlm.api.build import freeze_startup_heap  # noqa: E402
from meshlm.bench.dataset import BenchRequest  # noqa: E402
from meshlm.bench.throughput import run_offline  # noqa: E402
from meshlm.config import EngineArgs, EngineConfig  # noqa: E402
from meshlm.engine import coordinator as coordinator_module  # noqa: E402
from meshlm.engine.coordinator import Coordinator  # noqa: E402
from meshlm.executor.async_output import AsyncStepResult  # noqa: E402
from meshlm.protocol import StepResult  # noqa: E402
from meshlm.step_limits import LARGE_CARD_MAX_NUM_TOKENS  # noqa: E402


class InstantDispatcher:
    """Answers every plan at once: token 7 for each sampled row (never an end of sequence)."""

    def execute(self, plan):
        rows = len(plan.sample_rows)
        if not rows:
            return None
        return AsyncStepResult(ready=StepResult(np.full(rows, 7, dtype=np.int64), None, None, None))

    def shutdown(self) -> None:
        pass


def timed(owner, name: str, totals: dict) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall time to ``totals[name]``."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-batch-size", type=int, default=2048)
    p.add_argument("--no-async-scheduling", action="store_true", help="the plain loop")
    p.add_argument("--num-kv-blocks", type=int, help="the pool, in blocks of 16 (default: every request fits)")
    p.add_argument("--capacity-scheduler-policy", default="max_utilization")
    p.add_argument("--max-num-tokens", type=int, default=LARGE_CARD_MAX_NUM_TOKENS,
                   help="tokens a step (default: what an H200 takes by default)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args()
    shape = Path(tempfile.mkdtemp(prefix="meshlm-host-"))
    (shape / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 512,
        "max_position_embeddings": 1 << 20, "torch_dtype": "float32"}))
    tokens = a.num_prompts * (a.input_len + a.output_len)
    args = EngineArgs(model=str(shape), load_format="random", skip_tokenizer_init=True, device="cpu",
                      max_model_len=a.input_len + a.output_len, max_batch_size=a.max_batch_size,
                      num_kv_blocks=a.num_kv_blocks or tokens // 16 + a.num_prompts + 16,
                      async_scheduling=not a.no_async_scheduling, capacity_scheduler_policy=a.capacity_scheduler_policy,
                      max_num_tokens=a.max_num_tokens)
    config = EngineConfig.from_args(args)
    coordinator = Coordinator(InstantDispatcher(), config, None, args.num_kv_blocks, [2])
    totals: dict[str, float] = collections.defaultdict(float)
    for name in ("schedule", "update_from_output"):
        timed(coordinator.scheduler, name, totals)
    for name in ("_take_outputs", "step"):
        timed(coordinator, name, totals)
    timed(coordinator_module, "build_step_plan", totals)
    running = []  # sequences running after each step
    step = coordinator.step

    def counted_step():
        outputs = step()
        running.append(coordinator.num_running)
        return outputs
    coordinator.step = counted_step
    rng = random.Random(0)
    requests = [BenchRequest([rng.randrange(3, 500) for _ in range(a.input_len)], a.output_len, a.input_len)
                for _ in range(a.num_prompts)]
    freeze_startup_heap()  # as the runtime does after start-up
    start = time.perf_counter()
    run = run_offline(coordinator, requests, None, "host", False)
    wall = time.perf_counter() - start
    steps = run.steps.summary()
    sequence_steps = steps["num_decode_tokens"] + a.num_prompts  # every sampled row, first tokens included
    result = {"wall_s": wall, "steps": steps["num_steps"], "sequence_steps": sequence_steps,
              "us_per_sequence_step": 1e6 * wall / sequence_steps,
              "parts_s": dict(totals), "bench_loop_s": wall - totals["step"],
              "decode_only_steps": steps["num_decode_only_steps"], "mean_decode_batch": steps["mean_decode_batch"],
              "mean_decode_step_ms": steps["mean_decode_step_ms"]}
    print(f"{a.num_prompts} x {a.input_len}/{a.output_len}: {wall:.2f} s host, {result['steps']} steps, "
          f"{result['us_per_sequence_step']:.2f} us per sequence a step; decode-only steps at batch "
          f"{steps['mean_decode_batch']:.0f}: {steps['mean_decode_step_ms']:.2f} ms")
    for name, seconds in sorted({**totals, "bench loop": result["bench_loop_s"]}.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {seconds:7.3f} s  {1e6 * seconds / sequence_steps:6.2f} us per sequence a step")
    result["running_quantiles"] = {q: running[int(q * (len(running) - 1))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    result["num_preemptions"] = steps["num_preemptions"]
    print(f"  preemptions {steps['num_preemptions']}; sequences running at the 10/25/50/75/90 % points "
          f"of the run's steps: {'/'.join(str(n) for n in result['running_quantiles'].values())}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
