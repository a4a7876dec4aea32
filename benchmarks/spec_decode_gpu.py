"""Speculative decoding at batch 1 on one GPU: tokens/s at full acceptance for k = 2, 4, 8 drafts, and
the cost of a verify step (1 + k query tokens, eager) against a plain decode step (CUDA graph).

    python3 benchmarks/spec_decode_gpu.py --out spec_decode_gpu.json          (Llama-3-8B shape, bf16)
    MESHLM_DEVICE=cpu python3 benchmarks/spec_decode_gpu.py --shape tiny --output-len 32   (a CPU try)

Random weights give no text to look up, so the drafts come from an oracle: the plain greedy run's
own next tokens, which is what a draft model equal to the target proposes, at no drafting cost.
The acceptance it reaches is printed (bf16 verify and decode kernels may disagree on a near-tie).
The baseline is plain decoding with the overlapped loop (the default); speculative runs use the
plain loop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import model_dir  # noqa: E402


class OracleProposer:
    """Drafts the reference run's next tokens (full acceptance when the target agrees)."""

    def __init__(self, prompt: list[int], outputs: list[int], num_speculative_tokens: int):
        self.prompt_len, self.outputs, self.num_speculative_tokens = len(prompt), outputs, num_speculative_tokens

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        done = len(token_ids) - self.prompt_len
        return self.outputs[done:done + min(self.num_speculative_tokens, max_drafts)]


def timed_generate(coordinator, prompt: list[int], output_len: int) -> tuple[list[int], float, list[float]]:
    """Greedy generation stepped by hand: (output tokens, seconds, per-step seconds)."""
    from meshlm import SamplingParams
    coordinator.submit(prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    tokens, steps = [], []
    start = time.perf_counter()
    while coordinator.has_unfinished():
        s = time.perf_counter()
        for out in coordinator.step():
            tokens += out.outputs[0].token_ids
        steps.append(time.perf_counter() - s)
    return tokens, time.perf_counter() - start, steps


def engine_kwargs(ns) -> dict:
    return dict(model=str(model_dir(ns.shape)), load_format="random", skip_tokenizer_init=True,
                dtype=ns.dtype, max_model_len=1024, num_kv_blocks=ns.num_kv_blocks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--k", default="2,4,8")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args()
    from meshlm import LLM
    prompt = np.random.default_rng(0).integers(10, 30000, ns.input_len).tolist()
    with LLM(**engine_kwargs(ns)) as llm:  # the baseline: plain decoding, overlapped loop
        timed_generate(llm.engine_core, prompt, 8)  # warm-up
        reference, plain_s, plain_steps = timed_generate(llm.engine_core, prompt, ns.output_len)
    result = {"shape": ns.shape, "input_len": ns.input_len, "output_len": ns.output_len,
              "plain": {"tok_s": ns.output_len / plain_s, "step_ms_median": 1e3 * statistics.median(plain_steps[1:])},
              "speculative": []}
    spec = {"method": "ngram", "num_speculative_tokens": max(int(k) for k in ns.k.split(","))}
    with LLM(speculative_config=spec, **engine_kwargs(ns)) as llm:
        coordinator = llm.engine_core
        for k in [0] + [int(k) for k in ns.k.split(",")]:  # k = 0: the plain loop's decode steps
            coordinator.scheduler.proposer = OracleProposer(prompt, reference, k)
            timed_generate(coordinator, prompt, 8)  # warm-up
            before = coordinator.spec_decode_stats.num_draft_tokens, coordinator.spec_decode_stats.num_accepted_tokens
            tokens, seconds, steps = timed_generate(coordinator, prompt, ns.output_len)
            drafts = coordinator.spec_decode_stats.num_draft_tokens - before[0]
            accepted = coordinator.spec_decode_stats.num_accepted_tokens - before[1]
            result["speculative"].append({
                "k": k, "tok_s": ns.output_len / seconds, "speed_up": plain_s / seconds,
                "step_ms_median": 1e3 * statistics.median(steps[1:]), "num_steps": len(steps),
                "acceptance_rate": accepted / drafts if drafts else None, "same_tokens": tokens == reference})
    print(f"plain (overlapped loop): {result['plain']['tok_s']:.1f} tok/s, step {result['plain']['step_ms_median']:.2f} ms")
    print(f"{'k':>3} {'tok/s':>9} {'speed-up':>9} {'step ms':>9} {'steps':>6} {'accept':>7} {'same':>5}")
    for r in result["speculative"]:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        print(f"{r['k']:>3} {r['tok_s']:>9.1f} {r['speed_up']:>8.2f}x {r['step_ms_median']:>9.2f} "
              f"{r['num_steps']:>6} {accept:>7} {str(r['same_tokens']):>5}")
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
