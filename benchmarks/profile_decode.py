"""Where a decode step's time goes, on one GPU: for each batch size, the wall time of a few decode
steps of the Llama-3-8B shape (random bf16 weights), the GPU's busy time in them (the union of
kernel intervals from torch.profiler) and the top kernels.

    python3 benchmarks/profile_decode.py --batches 1,64,256,1024 --out profile.json

With ``--quantization fp8``, ``--no-fused-quantization`` has the norms and SiLU-and-mul write their
rows in bf16 for the FP8 products to quantize (the A/B of the fused quantization, kernels/fp8.py);
``--fast-accumulation`` / ``--no-fast-accumulation`` set ``torch._scaled_mm``'s ``use_fast_accum``;
``--fused-silu-product``: small batches' down projection computes SiLU-and-mul as it loads its input.
``--no-weight-preload``: the one-row product waits for the kernel ahead before loading any weight;
``--short-context-graphs N``: small batches' decode graphs for contexts of at most N tokens (0: none);
``--fused-merge`` / ``--no-fused-merge``: decode attention merges its splits in the split kernel or not;
``--max-batch-size``: fewer decode graphs to capture when only small batches are profiled.

With ``--prefill-tokens N``, each profiled step is a mixed one: prompts of ``--prompt-len`` tokens,
N in all, join the batch's decodes (they end after their first token, so the decodes stay the batch).

Prints one table last: the busy fraction is busy time / wall time of the profiled steps.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import model_dir  # noqa: E402


def busy_us(events) -> float:
    """The union of the kernels' [start, end) intervals, in microseconds."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class GcClock:
    """Seconds the garbage collector ran while ``running`` (gc.callbacks brackets each collection)."""

    def __init__(self):
        self.seconds, self._start, self.running = 0.0, 0.0, False
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if not self.running:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


GC_CLOCK = GcClock()


def timed_steps(coordinator, num_steps: int, before_step=lambda: None) -> tuple[float, float]:
    """Wall microseconds of ``num_steps`` steps without a profiler, and the GC's share of them."""
    torch.cuda.synchronize()
    GC_CLOCK.seconds, GC_CLOCK.running = 0.0, True
    start = time.perf_counter()
    for _ in range(num_steps):
        before_step()
        coordinator.step()
    torch.cuda.synchronize()
    GC_CLOCK.running = False
    return (time.perf_counter() - start) * 1e6, GC_CLOCK.seconds * 1e6


def print_kernel_table(batch: int, kernels, num_steps: int) -> None:
    """Every kernel of the profiled steps: launches and microseconds per step, heaviest first."""
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for e in kernels:
        count[e.name] += 1
        total[e.name] += e.time_range.end - e.time_range.start
    print(f"batch {batch}: kernels per step ({sum(count.values()) / num_steps:.0f} launches, "
          f"{sum(total.values()) / num_steps:.0f} us)")
    print(f"{'us/step':>9} {'launches':>9} {'us each':>8}  kernel")
    for name in sorted(total, key=lambda n: -total[n]):
        print(f"{total[name] / num_steps:>9.1f} {count[name] / num_steps:>9.1f} {total[name] / count[name]:>8.2f}  {name[:110]}")


def new_prompts(coordinator, rng, prompt_len: int, tokens: int):
    """A callable that submits ``tokens // prompt_len`` prompts of ``prompt_len`` that end after their
    first token, so each step after it prefills them beside the running decodes (a mixed step)."""
    from meshlm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def submit() -> None:
        for _ in range(tokens // prompt_len):
            coordinator.submit(rng.integers(0, 32000, prompt_len).tolist(), params)
    return submit


def profile_batch(coordinator, batch: int, num_steps: int, host_table: bool = False,
                  kernel_table: bool = False, prompt_len: int = 128, prefill_tokens: int = 0) -> dict:
    from meshlm import SamplingParams
    rng = np.random.default_rng(batch)
    prefill_steps = -(-batch * prompt_len // 8192)
    params = SamplingParams(temperature=0.0, max_tokens=16 + 5 * num_steps + prefill_steps, ignore_eos=True)
    ids = [coordinator.submit(rng.integers(0, 32000, prompt_len).tolist(), params) for _ in range(batch)]
    for _ in range(4 + prefill_steps):  # the prompts' prefill
        coordinator.step()
    before_step = new_prompts(coordinator, rng, prompt_len, prefill_tokens) if prefill_tokens else lambda: None
    timed_steps(coordinator, num_steps, before_step)  # warm-up: some decode (or mixed) steps
    plain_us, gc_us = timed_steps(coordinator, num_steps, before_step)
    # Kernels only, unless the host's ops are asked for: tracing every CPU op slows the host.
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if host_table:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(num_steps):
            before_step()
            coordinator.step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    if host_table:  # where the host's time goes: CUDA runtime calls (waits, copies) and Python-side ops
        print(f"batch {batch}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernel_table:
        print_kernel_table(batch, kernels, num_steps)
    by_name: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_name[e.name] += e.time_range.end - e.time_range.start
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    for request_id in ids:
        coordinator.abort(request_id)
    while coordinator.has_unfinished():  # the aborts, and new prompts still queued
        coordinator.step()
    busy = busy_us(kernels)
    return {"batch": batch, "step_ms": wall_us / num_steps / 1e3, "busy_ms": busy / num_steps / 1e3,
            "busy_fraction": busy / wall_us, "unprofiled_step_ms": plain_us / num_steps / 1e3,
            "unprofiled_busy_fraction": busy / plain_us, "gc_ms": gc_us / num_steps / 1e3,
            "top_kernels": [(name[:60], us / num_steps / 1e3) for name, us in top]}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256,1024")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--host-table", action="store_true", help="print the host-side ops of each batch")
    parser.add_argument("--kernel-table", action="store_true", help="print every kernel of each batch's steps")
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="the engine's max_model_len (decode graphs split batch-1 attention by it)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens of each prompt (the decode context)")
    parser.add_argument("--fast-accumulation", action=argparse.BooleanOptionalAction, default=None,
                        help="FP8 products through torch._scaled_mm with use_fast_accum (default: meshlm's)")
    parser.add_argument("--fused-silu-product", action=argparse.BooleanOptionalAction, default=None,
                        help="small batches' down projection computes SiLU-and-mul as it loads (default: meshlm's)")
    parser.add_argument("--gated-one-row", action=argparse.BooleanOptionalAction, default=None,
                        help="one row's gate/up product ends in SiLU-and-mul, no kernel of its own "
                             "(kernels/one_row.py's one_row_silu_and_mul; default: meshlm's)")
    parser.add_argument("--qkv-rotary-one-row", action=argparse.BooleanOptionalAction, default=None,
                        help="one row's QKV product ends in rotary and the KV cache's store, no kernel of its own "
                             "(kernels/one_row.py's one_row_qkv_rotary_cache; default: meshlm's)")
    parser.add_argument("--norm-in-products", action=argparse.BooleanOptionalAction, default=None,
                        help="one row's output and down products add the residual and the next products take the "
                             "RMS norm, no norm kernel (kernels/one_row.py's SummedRow; default: meshlm's)")
    parser.add_argument("--norm-in-blocks", choices=["attention", "mlp"], default=None,
                        help="with --norm-in-products: only this block's last product adds the residual and hands "
                             "its norm over (default: both)")
    parser.add_argument("--prefill-tokens", type=int, default=0,
                        help="profile mixed steps: prompts of --prompt-len totalling this many tokens join each step")
    parser.add_argument("--quantization", default=None, help="fp8: FP8 weights quantized at load")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    parser.add_argument("--fused-quantization", action=argparse.BooleanOptionalAction, default=True,
                        help="FP8 products take rows the norm / SiLU-and-mul kernel quantized (default), "
                             "or quantize bf16 rows themselves")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="the overlapped step loop (default) or the plain one")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="programmatic dependent launch of the Triton kernels (where the GPU has it)")
    parser.add_argument("--weight-preload", action=argparse.BooleanOptionalAction, default=None,
                        help="the one-row product loads its first weight tile before waiting for the kernel "
                             "ahead (kernels/triton_launch.py; default: meshlm's)")
    parser.add_argument("--short-context-graphs", type=int, default=None,
                        help="small batches also get decode graphs for contexts of at most this many tokens "
                             "(executor/cuda_graphs.py; 0: none; default: meshlm's)")
    parser.add_argument("--fused-merge", action=argparse.BooleanOptionalAction, default=None,
                        help="decode attention merges its splits inside the split kernel (DecodeTiles.fused_merge) "
                             "or in a second kernel, at every batch (default: meshlm's per-shape choice)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the engine's max_batch_size (default: automatic); fewer decode graphs to capture")
    return parser.parse_args()


def _force_fused_merge(enabled: bool) -> None:
    """Every decode attention launch from now on takes ``fused_merge=enabled`` over its chosen tiles."""
    import dataclasses

    from meshlm.kernels import decode_attention
    chosen = decode_attention.decode_tiles
    decode_attention.decode_tiles = lambda *args, **kwargs: dataclasses.replace(chosen(*args, **kwargs),
                                                                                 fused_merge=enabled)


def _norm_in_one_block(block: str) -> None:
    """Only ``block``'s (attention or mlp) last product adds the residual from now on: the block
    after the other one is said not to take the norm (takes_summed_row), so the norm kernel runs there."""
    from meshlm.models.llama import LlamaAttention, LlamaMLP
    taker = LlamaAttention if block == "attention" else LlamaMLP  # the block after the MLP is attention
    taker.takes_summed_row = lambda self: False


def main() -> int:
    ns = _parse()
    from meshlm import LLM
    from meshlm.kernels.fp8 import set_fast_accumulation, set_fused_quantization, set_fused_silu_product
    from meshlm.kernels.triton_launch import set_programmatic_launch
    set_programmatic_launch(ns.pdl)
    set_fused_quantization(ns.fused_quantization)
    if ns.fast_accumulation is not None:
        set_fast_accumulation(ns.fast_accumulation)
    if ns.fused_silu_product is not None:
        set_fused_silu_product(ns.fused_silu_product)
    if ns.gated_one_row is not None:
        from meshlm.kernels.one_row import set_gated_one_row
        set_gated_one_row(ns.gated_one_row)
    if ns.qkv_rotary_one_row is not None:
        from meshlm.kernels.one_row import set_qkv_rotary_one_row
        set_qkv_rotary_one_row(ns.qkv_rotary_one_row)
    if ns.norm_in_products is not None:
        from meshlm.kernels.one_row import set_norm_in_products
        set_norm_in_products(ns.norm_in_products)
    if ns.norm_in_blocks is not None:
        _norm_in_one_block(ns.norm_in_blocks)
    if ns.short_context_graphs is not None:
        from meshlm.executor.cuda_graphs import set_short_context_graphs
        set_short_context_graphs(ns.short_context_graphs)
    if ns.weight_preload is not None:
        from meshlm.kernels.triton_launch import set_weight_preload
        set_weight_preload(ns.weight_preload)
    if ns.fused_merge is not None:
        _force_fused_merge(ns.fused_merge)
    llm = LLM(str(model_dir("llama3-8b")), load_format="random", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=ns.max_model_len, async_scheduling=ns.async_scheduling, kv_cache_dtype=ns.kv_cache_dtype,
              **({"quantization": ns.quantization} if ns.quantization else {}),
              **({"max_batch_size": ns.max_batch_size} if ns.max_batch_size else {}))
    rows = [profile_batch(llm.engine_core, int(b), ns.steps, ns.host_table, ns.kernel_table, ns.prompt_len,
                         ns.prefill_tokens)
            for b in ns.batches.split(",")]
    llm.shutdown()
    if ns.out:
        Path(ns.out).write_text(json.dumps({"card": torch.cuda.get_device_name(0), "fused_quantization":
                                            ns.fused_quantization, "rows": rows}, indent=1))
    print(f"card: {torch.cuda.get_device_name(0)}  async_scheduling={ns.async_scheduling}  "
          f"quantization={ns.quantization}  fused_quantization={ns.fused_quantization}  "
          f"kv_cache_dtype={ns.kv_cache_dtype}  prompt_len={ns.prompt_len}  pdl={ns.pdl}  "
          f"prefill_tokens={ns.prefill_tokens}  fast_accumulation={ns.fast_accumulation}  "
          f"fused_silu_product={ns.fused_silu_product}  gated_one_row={ns.gated_one_row}  "
          f"qkv_rotary_one_row={ns.qkv_rotary_one_row}  weight_preload={ns.weight_preload}  "
          f"short_context_graphs={ns.short_context_graphs}  fused_merge={ns.fused_merge}  "
          f"norm_in_products={ns.norm_in_products}  norm_in_blocks={ns.norm_in_blocks}")
    print("step: profiled wall per step; plain: the same steps unprofiled (busy = GPU busy / plain step);"
          " gc: the garbage collector's time per unprofiled step")
    print(f"{'batch':>6} {'step ms':>8} {'plain ms':>9} {'GPU busy ms':>12} {'busy':>6} {'gc ms':>6}  top kernels (ms per step)")
    for r in rows:
        top = ", ".join(f"{name.split('(')[0][:28]} {ms:.2f}" for name, ms in r["top_kernels"][:4])
        print(f"{r['batch']:>6} {r['step_ms']:>8.2f} {r['unprofiled_step_ms']:>9.2f} {r['busy_ms']:>12.2f} "
              f"{r['unprofiled_busy_fraction']:>6.0%} {r['gc_ms']:>6.2f}  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
