"""One row times a weight on the CUDA cores (no tensor cores), against the small-batch product.

    python3 benchmarks/gemv_bench.py [--fp8] [--layers 32] [--out gemv.json]

The small-batch product (kernels/fp8_gemm_triton.py) pads one row to 16 and multiplies on the
tensor cores, widening a float8 weight to bf16 first. The one-row product (kernels/gemv_triton.py)
widens each weight tile to float32 and multiplies-adds it with the row, summing once at the end.
Per Llama-3-8B shape, 32 distinct weights (so L2 holds none of them) in one CUDA graph, for a grid
of the one-row product's launch shapes: the fastest against the small-batch product's own launch,
in microseconds a product and TB/s of weight read. ``--write-config`` records the shapes where
the one-row product won (kernels/configs/).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlm.kernels.fp8_gemm_triton import choose_tiles, fp8_weight_gemm  # noqa: E402
from meshlm.kernels.gemv_triton import GemvTiles, gemv_config, one_row_gemm  # noqa: E402
from meshlm.kernels.triton_launch import num_sms, set_weight_preload  # noqa: E402
from meshlm.kernels.tuned_configs import config_path, device_name  # noqa: E402
from weight_read_floor import timed_chain  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_N, BLOCK_K, warps)
TILES = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (32, 512, 8), (8, 1024, 4), (4, 1024, 4)]
SPLITS = [1, 2, 4, 8]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write-config", action="store_true",
                        help="record each shape's fastest launch for this card (kernels/configs/), "
                             "where it beat the small-batch product")
    parser.add_argument("--weight-preload", action=argparse.BooleanOptionalAction, default=True,
                        help="the one-row product loads its first weight tile before the PDL wait (default)")
    args = parser.parse_args()
    dtype = torch.float8_e4m3fn if args.fp8 else torch.bfloat16
    set_weight_preload(args.weight_preload)
    rows = {}
    for name, (n, k) in SHAPES.items():
        weights = [(torch.randn(n, k, device="cuda") * 0.05).to(dtype) for _ in range(args.layers)]
        scale = torch.full((n,), 0.01, device="cuda") if args.fp8 else None
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        # the small-batch product's own launch shape (without it, one row would come here)
        small = choose_tiles(1, n, k, x.dtype, num_sms(x.device), device_name(x.device), dtype)
        want = fp8_weight_gemm(x, weights[0], scale, tiles=small).float()
        base = 1e3 * timed_chain(lambda: [fp8_weight_gemm(x, w, scale, tiles=small) for w in weights], 20) / args.layers
        results = []
        for tiles, split in itertools.product(TILES, SPLITS):
            if (k // split) % tiles[1]:
                continue
            launch = GemvTiles(tiles[0], tiles[1], split, tiles[2])
            out = one_row_gemm(x, weights[0], scale, None, launch).float()
            err = (out - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
            us = 1e3 * timed_chain(lambda t=launch: [one_row_gemm(x, w, scale, None, t) for w in weights], 20) / args.layers
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
