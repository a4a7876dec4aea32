"""FP8 linear layers on one GPU at Llama-3-8B's shapes: bf16 matmul against the FP8 paths.

    python benchmarks/fp8_gemm_bench.py                       # every shape, M = 1 ... 4096
    python benchmarks/fp8_gemm_bench.py --rows 1,16 --iters 200 --output-json fp8_gemm.json

For each weight (QKV 6144 x 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336) and
batch of M rows it times, with CUDA events over ``--iters`` calls after a warm-up:

- ``bf16``: ``F.linear`` on the bf16 weight (the baseline);
- ``scaled``: meshlm's FP8 path for large batches: per-token activation quantization, then
  ``torch._scaled_mm`` with rowwise scales;
- ``scaled_mm``: ``torch._scaled_mm`` alone on activations quantized beforehand (what the
  quantization costs is the difference to ``scaled``);
- ``weight_only``: the small-batch alternative: the float8 weight widened to bf16, a bf16 matmul,
  the per-channel scale on the output.

It prints the time, TFLOP/s (2 M N K / t) and TB/s (the bytes each path must read and write: weight,
activations in, output); compare them with the card's bf16 and FP8 peaks and its memory bandwidth
(benchmarks/RESULTS.md has the H200's). Each weight is copied enough times to overflow L2, and the calls cycle through the copies, so a small
batch reads its weight from memory as a decode step does. The last line suggests
``meshlm.kernels.fp8.WEIGHT_ONLY_MAX_ROWS``: the largest M below which ``weight_only`` beat
``scaled`` on every shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshlm.kernels import fp8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 16, 64, 256, 1024, 4096)
L2_BYTES = 256 * 2**20  # enough copies of a weight to read it from memory each call


def time_us(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) * 1000 / iters


def paths(x: torch.Tensor, weights: list[tuple]) -> dict:
    """Each path as a callable that cycles through the weight copies."""
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(weights)
        return weights[state["i"]]

    x_q, x_scale = fp8.quantize_per_row(x)

    def scaled_mm_alone():
        _, w_q, w_scale = next_copy()
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)

    return {
        "bf16": lambda: F.linear(x, next_copy()[0]),
        "scaled": lambda: fp8.scaled_linear(x, *next_copy()[1:]),
        "scaled_mm": scaled_mm_alone,
        "weight_only": lambda: fp8.weight_only_linear(x, *next_copy()[1:]),
    }


def bytes_moved(path: str, m: int, n: int, k: int) -> int:
    weight = n * k * (2 if path == "bf16" else 1)
    x_in = m * k * (1 if path == "scaled_mm" else 2)
    return weight + x_in + m * n * 2


def bench_shape(name: str, n: int, k: int, rows, iters: int) -> list[dict]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w_q, w_scale = fp8.quantize_per_row(w)
    copies = max(1, -(-L2_BYTES // (n * k)))
    weights = [(w.clone(), w_q.clone(), w_scale[:, 0].clone()) for _ in range(copies)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for path, fn in paths(x, weights).items():
            t = time_us(fn, iters)
            results.append({"shape": name, "n": n, "k": k, "m": m, "path": path, "us": t,
                            "tflops": 2 * m * n * k / t / 1e6, "tbps": bytes_moved(path, m, n, k) / t / 1e6})
            r = results[-1]
            print(f"{name:8s} {n:6d}x{k:<6d} M={m:<5d} {path:12s} {t:9.1f} us {r['tflops']:8.1f} TFLOP/s "
                  f"{r['tbps']:6.2f} TB/s", flush=True)
    del weights
    torch.cuda.empty_cache()
    return results


def suggest_threshold(results: list[dict], rows) -> int:
    """The largest M such that weight_only beat scaled on every shape at every M up to it."""
    best = 0
    for m in sorted(rows):
        at_m = [r for r in results if r["m"] == m]
        by = {(r["shape"], r["path"]): r["us"] for r in at_m}
        if all(by[(s, "weight_only")] < by[(s, "scaled")] for s in {r["shape"] for r in at_m}):
            best = m
        else:
            break
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="batch rows M, comma separated")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("fp8_gemm_bench.py needs a CUDA GPU")
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    results = []
    for name, (n, k) in SHAPES.items():
        results += bench_shape(name, n, k, rows, args.iters)
    threshold = suggest_threshold(results, rows)
    print(f"suggested WEIGHT_ONLY_MAX_ROWS = {threshold} (now {fp8.WEIGHT_ONLY_MAX_ROWS})")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                      "results": results, "weight_only_max_rows": threshold},
                                                     indent=2))


if __name__ == "__main__":
    main()
