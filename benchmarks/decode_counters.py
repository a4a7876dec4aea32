"""One decode-attention shape's kernels, launched a few times eagerly, for Nsight Compute to read
their hardware counters (DRAM throughput, occupancy, stall reasons), beside PyTorch SDPA's
kernels on the same keys and values laid out contiguously.

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats --launch-skip 6 --launch-count 6 \\
        python3 benchmarks/decode_counters.py --shape 1x32768 [--num-splits 64] [--kv-heads 2]

Runs the meshlm decode kernel (``decode_tiles`` and ``choose_num_splits`` unless given) ``--calls``
times, then SDPA as many times; with ``--launch-skip`` past the warm-up calls, ncu profiles the
last calls of both. Without ncu it prints each run's median time (CUDA events, eager launches).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_bench as bench  # noqa: E402  (puts the repository on the path)
from meshlm.kernels.decode_attention import paged_decode_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x32768", help="batch x context")
    parser.add_argument("--num-splits", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads a program (DecodeTiles)")
    parser.add_argument("--block-n", type=int, default=None)
    parser.add_argument("--calls", type=int, default=3)
    opts = parser.parse_args()
    batch, context = (int(x) for x in opts.shape.lower().split("x"))
    q, k_cache, v_cache, meta, (q4, k, v), _ = bench.make_batch(batch, context, 1)
    tiles, splits = bench.default_decode_shape(batch, context)
    changes = {name: value for name, value in (("kv_heads_per_program", opts.kv_heads), ("block_n", opts.block_n))
               if value is not None}
    tiles = dataclasses.replace(tiles, **changes)
    splits = opts.num_splits or splits
    runs = {f"decode {bench.decode_name(tiles, splits)}":
            lambda: paged_decode_attention(q, k_cache, v_cache, meta, bench.SCALE, None, tiles, splits),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=bench.SCALE, enable_gqa=True)}
    num_bytes = bench.decode_bytes(batch, context, k_cache)
    for name, fn in runs.items():
        for _ in range(opts.calls):
            fn()
        torch.cuda.synchronize()
    for name, fn in runs.items():
        ms = bench.median_ms(fn, iters=20)
        print(f"{name:<60}{ms * 1e3:>9.1f} us  {num_bytes / ms / 1e9:.2f} TB/s (eager)")


if __name__ == "__main__":
    main()
