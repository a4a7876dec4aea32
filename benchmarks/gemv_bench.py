"""One row times a weight on the CUDA cores (no tensor cores), against the small-batch product.

    python3 benchmarks/gemv_bench.py [--fp8] [--layers 32] [--stages 1,2,3] [--shapes qkv,down] [--jobs 16]
        [--norm-in] [--write-config] [--out gemv.json]

The small-batch product (kernels/fp8_gemm_triton.py) pads one row to 16 and multiplies on the
tensor cores, widening a float8 weight to bf16 first. The one-row product (kernels/gemv_triton.py)
widens each weight tile to float32 and multiplies-adds it with the row, summing once at the end.
Per Llama-3-8B shape, 32 distinct weights (so L2 holds none of them) in one CUDA graph, for a grid
of the one-row product's launch shapes: the fastest against the small-batch product's own launch,
in microseconds a product and TB/s of weight read. gate/up runs as the model runs it, ending in
SiLU-and-mul (K not split). ``--stages`` sweeps GemvTiles' num_stages too; ``--jobs`` processes
compile the shapes first; ``--norm-in``: qkv and gate/up take the RMS norm before them as a decode
step of one row gives it them (gemv_triton.NormIn over the 512 sums of squares of the product
before). ``--write-config`` records the shapes where the one-row product won (kernels/configs/).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlm.kernels.fp8_gemm_triton import choose_tiles, fp8_weight_gemm  # noqa: E402
from meshlm.kernels.gemv_triton import GemvTiles, NormIn, gemv_config, one_row_gemm  # noqa: E402
from meshlm.kernels.triton_launch import num_sms, set_weight_preload  # noqa: E402
from meshlm.kernels.tuned_configs import config_path, device_name  # noqa: E402
from weight_read_floor import timed_chain  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_N, BLOCK_K, warps)
TILES = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (32, 512, 8), (8, 1024, 4), (4, 1024, 4),
         (16, 128, 4), (32, 128, 4), (64, 256, 8)]
SPLITS = [1, 2, 4, 8]
NORM_IN_SHAPES = ("qkv", "gate_up")  # the products after a norm
NUM_PARTIALS = 512  # the output and down products' tiles of 8 channels at the 8B's 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-config", action="store_true",
                        help="record each shape's fastest launch for this card (kernels/configs/), "
                             "where it beat the small-batch product")
    parser.add_argument("--stages", default="1",
                        help="weight tiles in flight a program to sweep, comma-separated (GemvTiles.num_stages)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="which of the 8B's products, comma-separated")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling the launch shapes before they are timed")
    parser.add_argument("--norm-in", action="store_true",
                        help="qkv and gate/up take the norm before them (gemv_triton.NormIn), as a one-row step does")
    parser.add_argument("--weight-preload", action=argparse.BooleanOptionalAction, default=True,
                        help="the one-row product loads its first weight tile before the PDL wait (default)")
    args = parser.parse_args()
    dtype = torch.float8_e4m3fn if args.fp8 else torch.bfloat16
    set_weight_preload(args.weight_preload)
    variants = [int(stages) for stages in args.stages.split(",")]
    rows = {name: time_shape(name, dtype, variants, args) for name in args.shapes.split(",")}
    total_base = sum(r["small_batch_us"] for r in rows.values()) * 32 / 1e3
    total_gemv = sum(r["gemv_us"] for r in rows.values()) * 32 / 1e3
    print(f"32 layers' four products: small-batch {total_base:.3f} ms, gemv {total_gemv:.3f} ms")
    if args.out:
        card = torch.cuda.get_device_name(0)
        args.out.write_text(json.dumps({"card": card, "fp8": args.fp8, "rows": rows}, indent=1))
    if args.write_config:
        write_config(dtype, rows)
    return 0


def time_shape(name: str, dtype: torch.dtype, variants: list[int], args) -> dict:
    """The small-batch product and every swept one-row launch on ``name``'s shape, microseconds a product."""
    n, k = SHAPES[name]
    weights = [(torch.randn(n, k, device="cuda") * 0.05).to(dtype) for _ in range(args.layers)]
    scale = torch.full((n,), 0.01, device="cuda") if args.fp8 else None
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    # the small-batch product's own launch shape (without it, one row would come here)
    small = choose_tiles(1, n, k, x.dtype, num_sms(x.device), device_name(x.device), dtype)
    want = fp8_weight_gemm(x, weights[0], scale, tiles=small).float()
    base = 1e3 * timed_chain(lambda: [fp8_weight_gemm(x, w, scale, tiles=small) for w in weights], 20) / args.layers
    gated = name == "gate_up"  # as the model runs it: ending in SiLU-and-mul, K not split
    launches = [t for t in sweep(k, variants) if not gated or t.split_k == 1]
    norm_in = _norm_in(x.device) if args.norm_in and name in NORM_IN_SHAPES else None
    precompile(name, dtype, launches, args.jobs, args.weight_preload, norm_in is not None)
    results = []
    for launch in launches:
        out = one_row_gemm(x, weights[0], scale, None, launch).float()  # the plain product
        err = (out - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        us = 1e3 * timed_chain(lambda t=launch: [one_row_gemm(x, w, scale, None, t, gated, norm_in)
                                                 for w in weights], 20) / args.layers
        results.append((us, launch, err))
    results.sort(key=lambda r: r[0])
    size, (best_us, best, best_err) = n * k * dtype.itemsize, results[0]
    print(f"{name:8s} {n}x{k} {dtype}: small-batch {base:6.1f} us {size / base / 1e6:5.2f} TB/s; "
          f"gemv {best_us:6.1f} us {size / best_us / 1e6:5.2f} TB/s ({_shape(best)}, rel err {best_err:.1e}); "
          "next: " + ", ".join(f"{r[0]:.1f} {_shape(r[1])}" for r in results[1:4]))
    for variant in variants:  # each variant's best, when several were swept
        mine = [r for r in results if r[1].num_stages == variant]
        if len(variants) > 1 and mine:
            print(f"    stages {variant}: {mine[0][0]:6.1f} us "
                  f"{size / mine[0][0] / 1e6:5.2f} TB/s ({_shape(mine[0][1])})")
    return {"small_batch_us": base, "gemv_us": best_us, "tiles": dataclasses.asdict(best), "rel_err": best_err,
            "top": [(r[0], dataclasses.asdict(r[1])) for r in results[:5]]}


def _norm_in(device: torch.device) -> NormIn:
    """A norm handed to the product: the sums of squares of a 4096-wide row over 512 tiles."""
    return NormIn(torch.rand(NUM_PARTIALS, device=device) + 1.0, 1e-5)


def _shape(tiles: GemvTiles) -> str:
    return f"{tiles.block_n}x{tiles.block_k} w{tiles.num_warps} s{tiles.split_k} st{tiles.num_stages}"


def sweep(k: int, variants: list[int]) -> list[GemvTiles]:
    """The launch shapes tried for a weight of K columns: whole tiles a split, at least two tiles in
    flight a stage."""
    return [GemvTiles(tiles[0], tiles[1], split, tiles[2], stages)
            for tiles, split, stages in itertools.product(TILES, SPLITS, variants)
            if not (k // split) % tiles[1] and (stages == 1 or k // split // tiles[1] >= 2 * stages)]


def _compile_some(name: str, dtype: torch.dtype, launches: list[GemvTiles], preload: bool, with_norm: bool) -> None:
    """One launch of each of ``launches`` on ``name``'s shape: compiles them into Triton's cache."""
    set_weight_preload(preload)
    norm_in = _norm_in(torch.device("cuda")) if with_norm else None
    n, k = SHAPES[name]
    weight = torch.zeros(n, k, device="cuda").to(dtype)
    scale = torch.full((n,), 0.01, device="cuda") if dtype.itemsize == 1 else None
    x = torch.zeros(1, k, device="cuda", dtype=torch.bfloat16)
    for launch in launches:
        one_row_gemm(x, weight, scale, None, launch)  # the plain product, which checks each launch's error
        if norm_in is not None and name != "gate_up":
            one_row_gemm(x, weight, scale, None, launch, norm_in=norm_in)
        if name == "gate_up":
            one_row_gemm(x, weight, scale, None, launch, gated=True, norm_in=norm_in)
    torch.cuda.synchronize()


def precompile(name: str, dtype: torch.dtype, launches: list[GemvTiles], jobs: int, preload: bool,
               with_norm: bool) -> None:
    """Compiles ``launches`` in ``jobs`` processes at once (the timing then finds them in the cache)."""
    if jobs <= 1:
        return
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_some, [name] * jobs, [dtype] * jobs, [launches[i::jobs] for i in range(jobs)],
                      [preload] * jobs, [with_norm] * jobs))


def write_config(dtype: torch.dtype, rows: dict) -> None:
    """kernels/configs/<fp8|bf16>_weight_gemv_<card>.json: the shapes where the one-row product won."""
    card, kernel = torch.cuda.get_device_name(0), gemv_config(dtype)
    path = config_path(kernel, card)
    swept = {SHAPES[name] for name in rows}
    kept = [entry for entry in json.loads(path.read_text())["entries"]
            if (entry["n"], entry["k"]) not in swept] if path.exists() else []  # shapes not swept this time
    entries = kept + [{"n": SHAPES[name][0], "k": SHAPES[name][1], "max_rows": 1, "tiles": r["tiles"]}
               for name, r in rows.items() if r["gemv_us"] < r["small_batch_us"]]
    path.write_text(json.dumps({"kernel": kernel, "device": card, "entries": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} entries to {path}")


if __name__ == "__main__":
    sys.exit(main())
