"""Speculative decoding at batch 1 on one GPU: tokens/s at full acceptance for k = 2, 4, 8 drafts, and
the cost of a verify step (1 + k query tokens, in a verify CUDA graph) against a plain decode step.

    python3 benchmarks/spec_decode_gpu.py --out spec_decode_gpu.json          (Llama-3-8B shape, bf16)
    MESHLM_DEVICE=cpu python3 benchmarks/spec_decode_gpu.py --shape tiny --output-len 32   (a CPU try)

Random weights give no text to look up, so the drafts come from an oracle, at no drafting cost. A
first speculative run drafts the plain greedy run's tokens; the verify path and the decode path
round differently in bf16, so on near-ties its tokens part from the plain run's. The measured run
then drafts the first speculative run's tokens: every verify step computes each position's row with
the same kernels (one graph per batch bucket) whatever was accepted before, so these drafts are
accepted; the acceptance printed is the one measured. Each k has its own engine (its verify graphs
have 1 + k rows a sequence). The baseline is plain decoding with the overlapped loop (the default);
speculative runs use the plain loop, whose decode step (k = 0) is printed too.
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
    """Drafts a reference run's next tokens (full acceptance when the target agrees)."""

    def __init__(self, prompt: list[int], outputs: list[int], num_speculative_tokens: int):
        self.prompt_len, self.outputs, self.num_speculative_tokens = len(prompt), outputs, num_speculative_tokens

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        done = len(token_ids) - self.prompt_len
        return self.outputs[done:done + min(self.num_speculative_tokens, max_drafts)]


def timed_generate(coordinator, prompt: list[int], output_len: int) -> tuple[list[int], float, list[float]]:
    """Greedy generation stepped by hand: (output tokens, seconds, per-step seconds after the prefill)."""
    from meshlm import SamplingParams
    coordinator.submit(prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    tokens, steps = [], []
    start = time.perf_counter()
    while coordinator.has_unfinished():
        s = time.perf_counter()
        for out in coordinator.step():
            tokens += out.outputs[0].token_ids
        steps.append(time.perf_counter() - s)
    return tokens, time.perf_counter() - start, steps[1:]


def engine_kwargs(ns) -> dict:
    # Batch 1 only: a small max_batch_size keeps the graph captures few (it must exceed k, whose drafts
    # take sampler rows).
    return dict(model=str(model_dir(ns.shape)), load_format="random", skip_tokenizer_init=True,
                dtype=ns.dtype, max_model_len=1024, num_kv_blocks=ns.num_kv_blocks, max_batch_size=16)


def measure(llm, prompt: list[int], proposer, output_len: int) -> dict:
    """One timed run of ``proposer``'s drafts: tokens, tok/s, step times, acceptance, verify replays."""
    coordinator = llm.engine_core
    coordinator.scheduler.proposer = proposer
    stats = coordinator.spec_decode_stats
    graphs = llm.local_model_runner().verify_graph_runner
    before = stats.num_draft_tokens, stats.num_accepted_tokens, stats.num_verify_rows
    replays = 0 if graphs is None else graphs.num_replays
    tokens, seconds, steps = timed_generate(coordinator, prompt, output_len)
    drafts, accepted = stats.num_draft_tokens - before[0], stats.num_accepted_tokens - before[1]
    return {"tokens": tokens, "tok_s": output_len / seconds, "num_steps": len(steps) + 1,
            "step_ms_median": 1e3 * statistics.median(steps),
            "acceptance_rate": accepted / drafts if drafts else None,
            "num_verify_steps": stats.num_verify_rows - before[2],
            "verify_graph_replays": None if graphs is None else graphs.num_replays - replays}


def speculative_runs(ns, prompt: list[int], reference: list[int], k: int, plain_s: float,
                     with_plain_loop: bool) -> list[dict]:
    """In an engine with k drafts: the plain loop's decode steps (k = 0, when ``with_plain_loop``), a
    first run drafting the plain tokens, and the measured run drafting the first run's tokens."""
    from meshlm import LLM
    rows = []
    with LLM(speculative_config={"method": "ngram", "num_speculative_tokens": k}, **engine_kwargs(ns)) as llm:
        timed_generate(llm.engine_core, prompt, 8)  # warm-up
        if with_plain_loop:
            rows.append({"k": 0, **measure(llm, prompt, OracleProposer(prompt, reference, 0), ns.output_len)})
        first = measure(llm, prompt, OracleProposer(prompt, reference, k), ns.output_len)
        run = measure(llm, prompt, OracleProposer(prompt, first["tokens"], k), ns.output_len)
        if ns.profile:
            profile_steps(llm, prompt, OracleProposer(prompt, first["tokens"], k), k)
        if ns.host_profile:
            import cProfile
            import pstats
            with cProfile.Profile() as host:
                measure(llm, prompt, OracleProposer(prompt, first["tokens"], k), 64)
            print(f"k={k}: the host's functions over 64 tokens, by own time")
            pstats.Stats(host).sort_stats("tottime").print_stats(30)
        run["first_run_acceptance_rate"] = first["acceptance_rate"]
        run["same_tokens_as_first_run"] = run["tokens"] == first["tokens"]
        rows.append({"k": k, **run})
    for row in rows:
        row["speed_up"] = plain_s / (ns.output_len / row["tok_s"])
        row["same_tokens_as_plain"] = row.pop("tokens") == reference
    return rows


def profile_steps(llm, prompt: list[int], proposer, k: int) -> None:
    """The kernels of 32 generated tokens' steps (after the prefill), and the GPU's busy share of them."""
    import torch
    from profile_decode import busy_us, print_kernel_table
    coordinator = llm.engine_core
    coordinator.scheduler.proposer = proposer
    from meshlm import SamplingParams
    coordinator.submit(prompt, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    coordinator.step()  # the prefill
    torch.cuda.synchronize()
    num_steps = 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        while coordinator.has_unfinished():
            coordinator.step()
            num_steps += 1
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"k={k}: {num_steps} steps, {wall_us / num_steps / 1e3:.2f} ms a step (profiled), GPU busy "
          f"{busy_us(kernels) / num_steps / 1e3:.2f} ms a step")
    print_kernel_table(f"k={k}", kernels, num_steps)


def print_table(result: dict) -> None:
    plain = result["plain"]
    print(f"plain (overlapped loop): {plain['tok_s']:.1f} tok/s, step {plain['step_ms_median']:.2f} ms")
    loop = next((r for r in result["speculative"] if r["k"] == 0), None)
    base_ms = loop["step_ms_median"] if loop else plain["step_ms_median"]
    print(f"{'k':>3} {'tok/s':>9} {'speed-up':>9} {'step ms':>8} {'x plain':>8} {'steps':>6} {'accept':>7} "
          f"{'1st acc':>8} {'graphs':>11}")
    for r in result["speculative"]:
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        first = r.get("first_run_acceptance_rate")
        graphs = "-" if r["verify_graph_replays"] is None else f"{r['verify_graph_replays']}/{r['num_verify_steps']}"
        print(f"{r['k']:>3} {r['tok_s']:>9.1f} {r['speed_up']:>8.2f}x {r['step_ms_median']:>8.2f} "
              f"{r['step_ms_median'] / base_ms:>7.2f}x {r['num_steps']:>6} {accept:>7} "
              f"{'-' if first is None else f'{first:.2f}':>8} {graphs:>11}")
    print("step ms: median step after the prefill; x plain: against the plain loop's decode step (k = 0);"
          " graphs: verify steps replayed from a verify graph / verify steps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--k", default="2,4,8")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true", help="print the kernels of each k's verify steps")
    parser.add_argument("--host-profile", action="store_true", help="print the host's hot functions (cProfile)")
    ns = parser.parse_args()
    from meshlm import LLM
    prompt = np.random.default_rng(0).integers(10, 30000, ns.input_len).tolist()
    with LLM(**engine_kwargs(ns)) as llm:  # the baseline: plain decoding, overlapped loop
        timed_generate(llm.engine_core, prompt, 8)  # warm-up
        reference, plain_s, plain_steps = timed_generate(llm.engine_core, prompt, ns.output_len)
    result = {"shape": ns.shape, "dtype": ns.dtype, "input_len": ns.input_len, "output_len": ns.output_len,
              "plain": {"tok_s": ns.output_len / plain_s, "step_ms_median": 1e3 * statistics.median(plain_steps)},
              "speculative": []}
    for i, k in enumerate(int(k) for k in ns.k.split(",")):
        result["speculative"] += speculative_runs(ns, prompt, reference, k, plain_s, with_plain_loop=i == 0)
    print_table(result)
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
