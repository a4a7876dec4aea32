"""FP8 linear layers on one GPU at Llama-3-8B's shapes: bf16 matmul against the FP8 paths.

    python benchmarks/fp8_gemm_bench.py                       # every shape, M = 1 ... 4096
    python benchmarks/fp8_gemm_bench.py --rows 1,16 --iters 200 --output-json fp8_gemm.json
    python benchmarks/fp8_gemm_bench.py --sweep               # and the small-batch kernel's launch shapes

For each weight (QKV 6144 x 4096, o_proj 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336) and
batch of M rows it times, in a CUDA graph of ``--iters`` calls after a warm-up (decode steps run in
graphs, and a launch from Python takes longer than a small product):

- ``bf16``: ``F.linear`` on the bf16 weight (the baseline);
- ``scaled``: meshlm's FP8 path for large batches: per-token activation quantization, then
  ``torch._scaled_mm`` with rowwise scales;
- ``scaled_mm``: ``torch._scaled_mm`` alone on activations quantized beforehand (what the
  quantization costs is the difference to ``scaled``);
- ``weight_only``: meshlm's FP8 path for small batches (M <= ``WEIGHT_ONLY_MAX_ROWS``): the Triton
  kernel of kernels/fp8_gemm_triton.py, activations unquantized, the float8 weight widened in
  registers; timed up to M = 64.

It prints the card's copy bandwidth, then per path the time, TFLOP/s (2 M N K / t) and the weight's
bytes read per second (TB/s; a batch-1 product can at best read its weight at the copy rate), and
per M the sum over the 32 layers of the four products (a decode step's linear layers). Each
weight is copied enough times to overflow L2, and the calls cycle through the copies, so a small
batch reads its weight from memory as a decode step does. Then it suggests
``meshlm.kernels.fp8.WEIGHT_ONLY_MAX_ROWS``: the largest M up to which ``weight_only`` beat
``scaled`` on every shape.

``--sweep`` searches the kernel's launch shape (BLOCK_N, BLOCK_K, split-K, warps, stages, operand
order, how the weight is widened and the splits added) for each shape at each of ``--sweep-rows``:
from the default (``choose_tiles``), one parameter at a time over its values, keeping the fastest,
twice over; it prints the fastest per shape beside the default, and ``--write-config`` records them
for this card in ``meshlm/kernels/configs/`` (kernels/tuned_configs.py), where ``choose_tiles``
looks first.
Most of its time is Triton compiling the launch shapes (a few minutes at most).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from meshlm.kernels import fp8  # noqa: E402
from meshlm.kernels.fp8_gemm_triton import FP8GemmTiles, choose_tiles, fp8_weight_gemm  # noqa: E402
from meshlm.kernels.tuned_configs import config_path, small_batch_gemm_config  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 2, 4, 8, 16, 32, 64, 256, 4096)
NUM_LAYERS = 32
WEIGHT_ONLY_ROWS = 64  # the small-batch kernel is timed up to this M
L2_BYTES = 256 * 2**20  # enough copies of a weight to read it from memory each call
# The values the sweep tries for each launch parameter.
SWEEP = {"block_n": (16, 32, 64, 128), "block_k": (128, 256, 512), "split_k": (1, 2, 3, 4, 6, 8, 12, 16),
         "num_warps": (2, 4, 8), "num_stages": (2, 3, 4, 5), "swap_ab": (False, True), "asm_widen": (True, False),
         "serial_reduce": (True, False), "l2_prefetch": (False, True)}


def time_us(fn, iters: int) -> float:
    """Microseconds per call of ``fn``, replayed in a CUDA graph of ``iters`` calls (as decode steps
    run: a launch from Python takes longer than a small product, so eager timing would measure it)."""
    for _ in range(3):
        fn()  # compile, and make what the first call makes (the split-K counters) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    graph.replay()
    stop.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(stop) * 1000 / iters


def copy_tbps() -> float:
    """The card's copy bandwidth (bytes read and written per second) on a 2 GiB buffer: the ceiling
    of a product bound by its weight bytes."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_us(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / t / 1e6


class Copies:
    """Copies of one weight (bf16, float8, scale), handed out in turn."""

    def __init__(self, n: int, k: int):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w_q, w_scale = fp8.quantize_per_row(w)
        count = max(1, -(-L2_BYTES // (n * k)))
        self.weights = [(w.clone(), w_q.clone(), w_scale[:, 0].clone()) for _ in range(count)]
        self.i = 0

    def next(self) -> tuple:
        self.i = (self.i + 1) % len(self.weights)
        return self.weights[self.i]


def paths(x: torch.Tensor, copies: Copies) -> dict:
    """Each path as a callable that cycles through the weight copies."""
    x_q, x_scale = fp8.quantize_per_row(x)

    def scaled_mm_alone():
        _, w_q, w_scale = copies.next()
        return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=torch.bfloat16)

    out = {
        "bf16": lambda: F.linear(x, copies.next()[0]),
        "scaled": lambda: fp8.scaled_linear(x, *copies.next()[1:]),
        "scaled_mm": scaled_mm_alone,
    }
    if x.shape[0] <= WEIGHT_ONLY_ROWS:
        out["weight_only"] = lambda: fp8_weight_gemm(x, *copies.next()[1:])
        out["bf16_triton"] = lambda: fp8_weight_gemm(x, copies.next()[0], None)
        l2 = dataclasses.replace(_bf16_tiles(x, copies), l2_prefetch=True)
        out["bf16_triton_l2"] = lambda: fp8_weight_gemm(x, copies.next()[0], None, tiles=l2)
    return out


def _bf16_tiles(x: torch.Tensor, copies: Copies) -> FP8GemmTiles:
    n, k = copies.weights[0][0].shape
    return choose_tiles(x.shape[0], n, k, x.dtype, torch.cuda.get_device_properties(0).multi_processor_count,
                        torch.cuda.get_device_name(), torch.bfloat16)


def weight_tbps(path: str, n: int, k: int, t_us: float) -> float:
    return n * k * (2 if path.startswith("bf16") else 1) / t_us / 1e6


def bench_shape(name: str, n: int, k: int, rows, iters: int) -> list[dict]:
    copies = Copies(n, k)
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for path, fn in paths(x, copies).items():
            t = time_us(fn, iters)
            r = {"shape": name, "n": n, "k": k, "m": m, "path": path, "us": t,
                 "tflops": 2 * m * n * k / t / 1e6, "weight_tbps": weight_tbps(path, n, k, t)}
            results.append(r)
            print(f"{name:8s} {n:6d}x{k:<6d} M={m:<5d} {path:12s} {t:9.1f} us {r['tflops']:8.1f} TFLOP/s "
                  f"{r['weight_tbps']:6.2f} TB/s of weight", flush=True)
    return results


def print_layer_totals(results: list[dict], rows) -> None:
    """The four products of Llama-3-8B's 32 layers per path: a decode step's linear layers."""
    for m in rows:
        totals = {}
        for r in results:
            if r["m"] == m:
                totals[r["path"]] = totals.get(r["path"], 0.0) + NUM_LAYERS * r["us"] / 1000
        print(f"M={m:<5d} {NUM_LAYERS} layers: " + ", ".join(f"{p} {t:.3f} ms" for p, t in totals.items()), flush=True)


def suggest_threshold(results: list[dict], rows) -> int:
    """The largest M such that weight_only beat scaled on every shape at every M up to it."""
    best = 0
    for m in sorted(rows):
        by = {(r["shape"], r["path"]): r["us"] for r in results if r["m"] == m}
        shapes = {s for s, _ in by}
        if all((s, "weight_only") in by and by[(s, "weight_only")] < by[(s, "scaled")] for s in shapes):
            best = m
        else:
            break
    return best


def _weight(copies: Copies, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The next copy's float8 weight and its scales, or its bf16 weight (no scale)."""
    w, w_q, w_scale = copies.next()
    return (w_q, w_scale) if weight == "fp8" else (w, None)


def time_tiles(x: torch.Tensor, copies: Copies, tiles: FP8GemmTiles, iters: int, weight: str) -> float | None:
    """Microseconds per call with ``tiles``; None where the launch shape does not compile or fit."""
    try:
        return time_us(lambda: fp8_weight_gemm(x, *_weight(copies, weight), tiles=tiles), iters)
    except Exception as exc:  # triton's OutOfResources and compile errors
        print(f"    skipped {tiles}: {type(exc).__name__}", flush=True)
        return None


def sweep_shape(name: str, n: int, k: int, m: int, iters: int, num_sms: int, weight: str) -> dict:
    """Coordinate search from the default launch shape: each parameter over its values, twice."""
    copies = Copies(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    weight_dtype = torch.bfloat16 if weight == "bf16" else torch.float8_e4m3fn
    default = choose_tiles(m, n, k, x.dtype, num_sms, torch.cuda.get_device_name(), weight_dtype)
    times = {default: time_tiles(x, copies, default, iters, weight)}
    best = default
    for _ in range(2):
        for field, values in SWEEP.items():
            for value in values:
                tiles = dataclasses.replace(best, **{field: value})
                if tiles not in times:
                    times[tiles] = time_tiles(x, copies, tiles, iters, weight)
            best = min((t for t in times if times[t] is not None), key=times.get)
    row = {"shape": name, "n": n, "k": k, "m": m, "weight": weight, "default": dataclasses.asdict(default),
           "default_us": times[default], "best": dataclasses.asdict(best), "best_us": times[best]}
    if weight == "bf16":  # the kernel serves 16-bit weights only where it beats cuBLAS
        row["cublas_us"] = time_us(lambda: F.linear(x, copies.next()[0]), iters)
        print(f"{name:8s} M={m:<3d} cuBLAS {row['cublas_us']:7.1f} us", flush=True)
    print(f"{name:8s} M={m:<3d} default {_describe(default)} {times[default]:7.1f} us "
          f"({weight_tbps(weight, n, k, times[default]):.2f} TB/s) | fastest {_describe(best)} "
          f"{times[best]:7.1f} us ({weight_tbps(weight, n, k, times[best]):.2f} TB/s)", flush=True)
    return row


def write_config(sweep: list[dict]) -> Path:
    """The sweep's fastest launch shape per (weight, rows) as the card's tuned-config file, which
    ``choose_tiles`` reads (an entry serves batches of up to its rows). For a bf16 weight only the
    shapes where the kernel beat cuBLAS: ``fp8.linear`` sends a 16-bit weight to it exactly there."""
    name = torch.cuda.get_device_name()
    entries = [{"n": r["n"], "k": r["k"], "max_rows": r["m"], "tiles": r["best"], "us": round(r["best_us"], 2),
                "default_us": round(r["default_us"], 2)} for r in sweep if r["best_us"] < r.get("cublas_us", float("inf"))]
    kernel = small_batch_gemm_config(torch.bfloat16 if sweep[0]["weight"] == "bf16" else torch.float8_e4m3fn)
    path = config_path(kernel, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kernel": kernel, "device": name, "entries": entries}, indent=1) + "\n")
    return path


def _describe(t: FP8GemmTiles) -> str:
    return (f"BLOCK_N={t.block_n} BLOCK_K={t.block_k} split_k={t.split_k} "
            f"warps={t.num_warps} stages={t.num_stages} swap_ab={int(t.swap_ab)} asm_widen={int(t.asm_widen)} "
            f"serial_reduce={int(t.serial_reduce)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="batch rows M, comma separated")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="search the small-batch kernel's launch shapes")
    parser.add_argument("--sweep-rows", default="1,16", help="batch rows M of the sweep, comma separated")
    parser.add_argument("--sweep-weight", choices=("fp8", "bf16"), default="fp8",
                        help="the weight the sweep's kernel reads (bf16: the same kernel with nothing to widen)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--write-config", action="store_true",
                        help="record the sweep's fastest launch shapes for this card in meshlm/kernels/configs/")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("fp8_gemm_bench.py needs a CUDA GPU")
    rows = [int(r) for r in args.rows.split(",")]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} ({num_sms} SMs), torch {torch.__version__}; "
          f"copy {copy_tbps():.2f} TB/s", flush=True)
    results = []
    for name, (n, k) in SHAPES.items():
        results += bench_shape(name, n, k, rows, args.iters)
        torch.cuda.empty_cache()
    print_layer_totals(results, rows)
    threshold = suggest_threshold(results, rows)
    print(f"suggested WEIGHT_ONLY_MAX_ROWS = {threshold} (now {fp8.WEIGHT_ONLY_MAX_ROWS})", flush=True)
    sweep = []
    if args.sweep:
        print("== launch shapes of the small-batch kernel (weight_only)", flush=True)
        for m in (int(r) for r in args.sweep_rows.split(",")):
            for name, (n, k) in SHAPES.items():
                sweep.append(sweep_shape(name, n, k, m, max(20, args.iters // 2), num_sms, args.sweep_weight))
                torch.cuda.empty_cache()
    if args.write_config and sweep:
        path = write_config(sweep)
        print(f"wrote {path}", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": results,
                                                      "weight_only_max_rows": threshold, "sweep": sweep}, indent=2))


if __name__ == "__main__":
    main()
