"""One row times a weight on the CUDA cores (no tensor cores), against the small-batch product.

    python3 benchmarks/gemv_bench.py [--fp8] [--layers 32] [--out gemv.json]

The small-batch product (kernels/fp8_gemm_triton.py) pads one row to 16 and multiplies on the
tensor cores, widening a float8 weight to bf16 first. For one row a plain dot product may do:
each program widens its weight tile to float32 and multiplies-adds it with the row into float32
sums, reduced once at the end; K split over programs, the splits added atomically (this
benchmark's shortcut: the order of the sums varies). Per Llama-3-8B shape, 32 distinct weights
(so L2 holds none of them) in one CUDA graph, for a grid of launch shapes: the fastest against the
small-batch product's recorded launch, in microseconds a product and TB/s of weight read.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlm.kernels.fp8_gemm_triton import choose_tiles, fp8_weight_gemm  # noqa: E402
from meshlm.kernels.gemv_triton import gemv_config  # noqa: E402
from meshlm.kernels.tuned_configs import config_path, device_name  # noqa: E402
from meshlm.kernels.triton_launch import num_sms, programmatic_launch  # noqa: E402
from weight_read_floor import timed_chain  # noqa: E402
from meshlm.kernels.triton_pdl import wait_for_previous_kernel  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_N, BLOCK_K, warps)
TILES = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (32, 512, 8), (8, 1024, 4), (4, 1024, 4)]
SPLITS = [1, 2, 4, 8]


@triton.jit
def _gemv_kernel(out_ptr, x_ptr, w_ptr, scale_ptr, N, k_per_split, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, PDL: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    w_ptrs = w_ptr + (rows % N).to(tl.int64)[:, None] * stride_wn + (k_start + ks)[None, :]
    x_ptrs = x_ptr + k_start + ks
    wait_for_previous_kernel(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for _ in range(0, k_per_split, BLOCK_K):
        w = tl.load(w_ptrs)
        x = tl.load(x_ptrs)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(scale_ptr + rows % N)
    tl.atomic_add(out_ptr + rows, y, mask=rows < N, sem="relaxed")


def gemv(out, x, w, scale, tiles, split) -> None:
    block_n, block_k, warps = tiles
    n, k = w.shape
    pdl = programmatic_launch(w.device)
    _gemv_kernel[(triton.cdiv(n, block_n), split)](
        out, x, w, scale if scale is not None else out, n, k // split, w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_SCALE=scale is not None, PDL=pdl, launch_pdl=pdl, num_warps=warps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-config", action="store_true",
                        help="record each shape's fastest launch for this card (kernels/configs/), "
                             "where it beat the small-batch product")
    args = parser.parse_args()
    dtype = torch.float8_e4m3fn if args.fp8 else torch.bfloat16
    rows = {}
    for name, (n, k) in SHAPES.items():
        weights = [(torch.randn(n, k, device="cuda") * 0.05).to(dtype) for _ in range(args.layers)]
        scale = torch.full((n,), 0.01, device="cuda") if args.fp8 else None
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        out = torch.zeros(1, n, device="cuda", dtype=torch.float32)
        # the small-batch product's own launch shape (without it, one row would come here)
        small = choose_tiles(1, n, k, x.dtype, num_sms(x.device), device_name(x.device), dtype)
        want = fp8_weight_gemm(x, weights[0], scale, tiles=small).float()
        base = 1e3 * timed_chain(lambda: [fp8_weight_gemm(x, w, scale, tiles=small) for w in weights], 20) / args.layers
        results = []
        for tiles, split in itertools.product(TILES, SPLITS):
            if (k // split) % tiles[1]:
                continue
            out.zero_()
            gemv(out, x, weights[0], scale, tiles, split)
            err = (out - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            us = 1e3 * timed_chain(lambda t=tiles, s=split: [gemv(out, x, w, scale, t, s) for w in weights], 20) / args.layers
            results.append((us, tiles, split, err))
        results.sort(key=lambda r: r[0])
        size = n * k * weights[0].element_size()
        best = results[0]
        rows[name] = {"small_batch_us": base, "gemv_us": best[0], "tiles": best[1], "split": best[2],
                      "rel_err": best[3], "top": [(r[0], r[1], r[2]) for r in results[:5]]}
        print(f"{name:8s} {n}x{k} {dtype}: small-batch {base:6.1f} us {size / base / 1e6:5.2f} TB/s; "
              f"gemv {best[0]:6.1f} us {size / best[0] / 1e6:5.2f} TB/s (tiles {best[1]}, split {best[2]}, "
              f"rel err {best[3]:.1e}); next: " + ", ".join(f"{r[0]:.1f} {r[1]} s{r[2]}" for r in results[1:4]))
        del weights
    total_base = sum(r["small_batch_us"] for r in rows.values()) * 32 / 1e3
    total_gemv = sum(r["gemv_us"] for r in rows.values()) * 32 / 1e3
    print(f"32 layers' four products: small-batch {total_base:.3f} ms, gemv {total_gemv:.3f} ms")
    if args.out:
        args.out.write_text(json.dumps({"card": torch.cuda.get_device_name(0), "fp8": args.fp8, "rows": rows}, indent=1))
    if args.write_config:
        write_config(dtype, rows)
    return 0


def write_config(dtype: torch.dtype, rows: dict) -> None:
    """kernels/configs/<fp8|bf16>_weight_gemv_<card>.json: the shapes where the one-row product won."""
    card, kernel = torch.cuda.get_device_name(0), gemv_config(dtype)
    entries = [{"n": SHAPES[name][0], "k": SHAPES[name][1], "max_rows": 1,
                "tiles": dict(zip(("block_n", "block_k", "num_warps"), r["tiles"])) | {"split_k": r["split"]}}
               for name, r in rows.items() if r["gemv_us"] < r["small_batch_us"]]
    path = config_path(kernel, card)
    path.write_text(json.dumps({"kernel": kernel, "device": card, "entries": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} entries to {path}")


if __name__ == "__main__":
    sys.exit(main())
