"""One decode-attention shape's kernels, launched a few times eagerly, for Nsight Compute to read
their hardware counters (DRAM throughput, occupancy, stall reasons), beside PyTorch SDPA's
kernels on the same keys and values laid out contiguously.

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy --section WarpStateStats --launch-skip 6 --launch-count 6 \\
        python3 benchmarks/decode_counters.py --shape 1x32768 [--num-splits 64] [--kv-heads 2]

Runs the meshlm decode kernel (``decode_tiles`` and ``choose_num_splits`` unless given) ``--calls``
times, then SDPA as many times; with ``--launch-skip`` past the warm-up calls, ncu profiles the
last calls of both. Without ncu it prints each run's median time (CUDA events, eager launches).

``--grid`` instead times, as CUDA-graph replays, the decode kernel at every combination of KV heads a
program (2, 4, 8), keys a tile (16, 32), pipeline stages (2, 3, 4), a register cap (none, 128) and
split counts (32 to 128), with the block tables shuffled as in attention_bench.py, and the default
launch and the fastest again over tables in order (each sequence's blocks consecutive in the
pool), against the copy rate measured in the same run: whether the paged layout, not the tiles,
costs the bandwidth.

``--tma-grid`` times, the same way, the descriptor kernel (``DecodeTiles.tma_kv``: one bulk copy a
cache block) at 1 or 2 KV heads a program x one or two cache blocks a tile x 2-4 stages x block ids
one or two tiles ahead x split counts; then its fastest launches, the default launch and SDPA's
kernel (contiguous keys) again, in interleaved rounds. ``--fused-grid`` does the same for the
default's switches at 1 or 2 KV heads a program x 32 or 64 keys x 2 or 3 stages x 16-64 splits,
merged inside the split kernel and by the merge kernel. ``--parts`` times the default launch's split
and merge kernels apart, and the same tiles with the merge inside the split kernel, in rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_bench as bench  # noqa: E402  (puts the repository on the path)
from meshlm.kernels import decode_attention  # noqa: E402
from meshlm.kernels.decode_attention import paged_decode_attention  # noqa: E402
from meshlm.kernels.kv_quant import kernel_scales  # noqa: E402
from meshlm.kernels.split_merge import merge_splits  # noqa: E402


GRID_KV_HEADS, GRID_BLOCK_N, GRID_STAGES, GRID_REGISTERS = (2, 4, 8), (16, 32), (2, 3, 4), (None, 128)
GRID_SPLITS = (32, 48, 64, 96, 128)


def time_grid(batch: int, context: int) -> None:
    """Graph replays of the decode kernel's grid of launch shapes (``--grid``), fastest first."""
    q, k_cache, v_cache, meta, _, _ = bench.make_batch(batch, context, 1)
    ordered = dataclasses.replace(meta, block_tables=torch.arange(
        meta.block_tables.numel(), device="cuda", dtype=torch.int32).view_as(meta.block_tables))
    copy_rate = bench.copy_tb_s()
    num_bytes = bench.decode_bytes(batch, context, k_cache)
    default, default_splits = bench.default_decode_shape(batch, context)

    def timed(tiles, splits, tables) -> float:
        return bench.graph_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, bench.SCALE, None, tiles,
                                                             splits)) * 1e3

    rows = [("default, shuffled", default, default_splits, timed(default, default_splits, meta))]
    for heads, block_n, stages, registers in itertools.product(GRID_KV_HEADS, GRID_BLOCK_N, GRID_STAGES,
                                                               GRID_REGISTERS):
        tiles = dataclasses.replace(default, kv_heads_per_program=heads, block_n=block_n, num_stages=stages,
                                    max_registers=registers)
        for splits in GRID_SPLITS:
            try:
                rows.append(("shuffled", tiles, splits, timed(tiles, splits, meta)))
            except Exception as error:  # shared memory or registers past the card's
                print(f"{bench.decode_name(tiles, splits)}: {type(error).__name__} {str(error)[:100]}", flush=True)
                break
    best = min(rows[1:], key=lambda row: row[3])
    rows += [("default, ordered", default, default_splits, timed(default, default_splits, ordered)),
             ("fastest, ordered", best[1], best[2], timed(best[1], best[2], ordered))]
    print(f"\n{torch.cuda.get_device_name()}, decode {batch} x {context} ({num_bytes / 1e9:.3f} GB), copy "
          f"{copy_rate:.2f} TB/s; graph replays, fastest first (then the default and the ordered tables)")
    shown = sorted(rows[1:-2], key=lambda row: row[3])[:20] + [rows[0]] + rows[-2:]
    for tables, tiles, splits, us in shown:
        rate = num_bytes / us / 1e6
        print(f"{tables:<18}{bench.decode_name(tiles, splits):<58}"
              f"{us:>8.1f} us {rate:>6.2f} TB/s {100 * rate / copy_rate:>6.1f} %")


TMA_KV_HEADS, TMA_BLOCK_N, TMA_STAGES, TMA_AHEAD, TMA_SPLITS = (1, 2), (16, 32), (2, 3, 4), (1, 2), (32, 64, 128)
# The merge inside the split kernel (--fused-grid): few splits keep the last split's merge short.
FUSED_KV_HEADS, FUSED_BLOCK_N, FUSED_STAGES, FUSED_SPLITS = (1, 2), (32, 64), (2, 3), (16, 24, 32, 48, 64)
LEADERS, ROUNDS = 4, 7


def tma_launches() -> dict:
    """``--tma-grid``: the descriptor kernel's launch shapes, name -> (tiles, splits)."""
    launches = {}
    for heads, block_n, stages, ahead in itertools.product(TMA_KV_HEADS, TMA_BLOCK_N, TMA_STAGES, TMA_AHEAD):
        tiles = dataclasses.replace(bench.SWITCHES_OFF, tma_kv=True, kv_heads_per_program=heads, block_n=block_n,
                                    num_stages=stages, prefetch_table=ahead)
        launches.update({bench.decode_name(tiles, splits): (tiles, splits) for splits in TMA_SPLITS})
    return launches


def fused_launches(default) -> dict:
    """``--fused-grid``: the default's switches at other tiles and few splits, the merge inside the
    split kernel and in its own kernel, name -> (tiles, splits)."""
    launches = {}
    for heads, block_n, stages, fused in itertools.product(FUSED_KV_HEADS, FUSED_BLOCK_N, FUSED_STAGES, (True, False)):
        tiles = dataclasses.replace(default, kv_heads_per_program=heads, block_n=block_n, num_stages=stages,
                                    fused_merge=fused)
        launches.update({bench.decode_name(tiles, splits): (tiles, splits) for splits in FUSED_SPLITS})
    return launches


def time_ranked(batch: int, context: int, fused: bool) -> None:
    """Graph replays of a grid of launch shapes (``--tma-grid``, ``--fused-grid``); then the
    fastest few, the default launch and SDPA again in ``ROUNDS`` interleaved rounds (median, min)."""
    q, k_cache, v_cache, meta, (q4, k, v), _ = bench.make_batch(batch, context, 1)
    copy_rate = bench.copy_tb_s()
    num_bytes = bench.decode_bytes(batch, context, k_cache)
    default, default_splits = bench.default_decode_shape(batch, context)

    def decode(tiles, splits):
        return lambda: paged_decode_attention(q, k_cache, v_cache, meta, bench.SCALE, None, tiles, splits)

    grid = {}
    for name, (tiles, splits) in (fused_launches(default) if fused else tma_launches()).items():
        try:
            grid[name] = (decode(tiles, splits), bench.graph_ms(decode(tiles, splits)))
        except Exception as error:  # shared memory past the card's
            print(f"{name}: {type(error).__name__} {str(error)[:100]}", flush=True)
    print(f"\n{torch.cuda.get_device_name()}, decode {batch} x {context} ({num_bytes / 1e9:.3f} GB), copy "
          f"{copy_rate:.2f} TB/s; graph replays, fastest first")
    ranked = sorted(grid.items(), key=lambda item: item[1][1])
    for name, (_, ms) in ranked[:16]:
        rate = num_bytes / ms / 1e9
        print(f"{name:<64}{ms * 1e3:>8.1f} us {rate:>6.2f} TB/s {100 * rate / copy_rate:>6.1f} %")
    runs = {name: fn for name, (fn, _) in ranked[:LEADERS]}
    runs[f"default {bench.decode_name(default, default_splits)}"] = decode(default, default_splits)
    runs["sdpa"] = lambda: F.scaled_dot_product_attention(q4, k, v, scale=bench.SCALE, enable_gqa=True)
    times = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, fn in runs.items():
            times[name].append(bench.graph_ms(fn))
    print(f"\nthe fastest {LEADERS}, the default and SDPA in {ROUNDS} interleaved rounds (median, min):")
    for name, ms in times.items():
        median, fastest = sorted(ms)[len(ms) // 2], min(ms)
        print(f"{name:<64}{median * 1e3:>8.1f} us {100 * num_bytes / median / 1e9 / copy_rate:>6.1f} %   min "
              f"{fastest * 1e3:>6.1f} us {100 * num_bytes / fastest / 1e9 / copy_rate:>6.1f} %")


def time_parts(batch: int, context: int, rounds: int = 7) -> None:
    """``--parts``: the default launch's two kernels apart, as graph replays in interleaved rounds:
    the whole call, the split kernel alone, the merge kernel alone (over the split kernel's
    partial outputs), the same tiles with the merge inside the split kernel, and SDPA."""
    q, k_cache, v_cache, meta, (q4, k, v), _ = bench.make_batch(batch, context, 1)
    copy_rate = bench.copy_tb_s()
    num_bytes = bench.decode_bytes(batch, context, k_cache)
    tiles, splits = bench.default_decode_shape(batch, context)
    out = torch.empty_like(q)
    partial = torch.empty((batch, q.shape[1], splits, q.shape[2]), dtype=torch.float32, device="cuda")
    lse = torch.empty(partial.shape[:-1], dtype=torch.float32, device="cuda")
    scales = kernel_scales(k_cache, None, None)  # a bf16 pool's placeholders
    fused = dataclasses.replace(tiles, fused_merge=True)
    runs = {f"whole call {bench.decode_name(tiles, splits)}":
            lambda: paged_decode_attention(q, k_cache, v_cache, meta, bench.SCALE, None, tiles, splits),
            "split kernel alone": lambda: decode_attention._launch(
                out, partial, lse, None, q, k_cache, v_cache, scales, meta, bench.SCALE, None, tiles, splits),
            "merge kernel alone": lambda: merge_splits(out, partial, lse),
            f"merge inside {bench.decode_name(fused, splits)}":
            lambda: paged_decode_attention(q, k_cache, v_cache, meta, bench.SCALE, None, fused, splits),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=bench.SCALE, enable_gqa=True)}
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(bench.graph_ms(fn))
    print(f"\n{torch.cuda.get_device_name()}, decode {batch} x {context} ({num_bytes / 1e9:.3f} GB), copy "
          f"{copy_rate:.2f} TB/s; graph replays, {rounds} interleaved rounds (median, min); per cent of copy "
          f"for the K and V bytes")
    for name, ms in times.items():
        median, fastest = sorted(ms)[len(ms) // 2], min(ms)
        print(f"{name:<64}{median * 1e3:>8.1f} us {100 * num_bytes / median / 1e9 / copy_rate:>6.1f} %   min "
              f"{fastest * 1e3:>6.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1x32768", help="batch x context")
    parser.add_argument("--num-splits", type=int, default=None)
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads a program (DecodeTiles)")
    parser.add_argument("--block-n", type=int, default=None)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--grid", action="store_true", help="time the grid of launch shapes as graph replays")
    parser.add_argument("--tma-grid", action="store_true", help="time the descriptor kernel's launch shapes")
    parser.add_argument("--fused-grid", action="store_true", help="time few splits merged inside the split kernel")
    parser.add_argument("--parts", action="store_true", help="time the default launch's kernels apart")
    opts = parser.parse_args()
    batch, context = (int(x) for x in opts.shape.lower().split("x"))
    if opts.parts:
        time_parts(batch, context)
        return
    if opts.tma_grid or opts.fused_grid:
        time_ranked(batch, context, opts.fused_grid)
        return
    if opts.grid:
        time_grid(batch, context)
        return
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
