"""Launch shapes of the prefill attention kernel (meshlm/kernels/prefill_attention.py) on one GPU,
against the bf16 matrix rate: Llama-3-8B's heads (32 query heads, 8 KV heads, head_dim 128, bf16,
KV block size 16, shuffled block tables), fresh causal prompts at 1 x 8k and 4 x 8k.

    python3 benchmarks/prefill_sweep.py [--shapes 1x8192,4x8192] [--max-seconds 200] [--graph] [--tma-grid]
        [--out s.json]

First the default tiles reading the step's own keys and values apart from the pool
(contiguous_kv: pointer loads; tma_kv: tensor-descriptor loads), also at 128-key tiles of 2
stages, then a grid of (BLOCK_M, BLOCK_N, warps, stages, GQA packing, block ids a tile ahead), then
k_transposed and the two ways of reading the step's keys on the fastest few of it. Every launch
gets the step's keys and values as the engine passes them. The launches compile first,
in parallel worker processes, into Triton's on-disk cache. Each launch is timed at every shape
(median of CUDA-event times after a warm-up) and checked against PyTorch SDPA on the same keys
and values laid out contiguously; FLOPs count the two products over the causal triangle
(4 x heads x head_dim x L(L+1)/2 a sequence). Runs that fail (shared memory) are skipped; once
``--max-seconds`` are spent no more launches are timed. Prints one table last: the default
tiles, SDPA, the fastest launches, and the fastest over all shapes as ``PrefillTiles(...)``
to paste into meshlm/kernels/prefill_tiles.py. ``--graph`` times each launch as replays of a CUDA
graph (attention_bench.graph_ms: the kernel without the host's launch work, which at 2k prompts
is a large part of an eager call); ``--tma-grid`` runs the whole grid with the step's keys read
by descriptors (the default's way), not only its finalists.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_bench import (  # noqa: E402
    GROUP, HEAD_DIM, NUM_HEADS, SCALE, copy_tb_s, graph_ms, make_batch, matmul_tflop_s, median_ms,
    prefill_name as name, step_kv)

from meshlm.kernels.prefill_attention import prefill_attention  # noqa: E402
from meshlm.kernels.prefill_tiles import PrefillTiles, prefill_tiles  # noqa: E402

SHAPES = "1x8192,4x8192"
# The coarse grid: (block_m, block_n, warps, stages, pack_gqa, prefetch_table), the likeliest first.
# prefetch_table changes how deep Triton pipelines the K/V loads, so it is swept with the stages;
# launches over the shared memory (e.g. 128 keys at 4 stages) fail and are skipped.
GRID = [PrefillTiles(m, n, w, s, pack, prefetch_table=prefetch) for pack, m, n, w, s, prefetch in
        itertools.product((True, False), (128, 64), (64, 128), (8, 4), (3, 2, 4), (True, False))]
SWITCHES = [dict(k_transposed=True), dict(contiguous_kv=True), dict(contiguous_kv=True, tma_kv=True)]
# Timed right after the default, so that a spent --max-seconds never leaves them out: the step's
# own keys by pointer loads and by descriptors at the default tiles and at 128-key tiles of 2
# stages (fewer, longer bulk copies; two stages of 128 keys fill as much shared memory as three of 64).
CONTIGUOUS = [dict(contiguous_kv=True), dict(contiguous_kv=True, tma_kv=True)]
LONG_KEYS = dict(block_n=128, num_stages=2)
NUM_FINALISTS = 3
GRAPH = False  # --graph


def precompile(launches: list[PrefillTiles], num_workers: int, deadline: float) -> None:
    """Compile ``launches`` in worker processes (Triton's disk cache keeps them for this one)."""
    start = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        results = pool.imap_unordered(_compile_one, [dataclasses.astuple(t) for t in launches])
        done = 0
        for _ in results:
            done += 1
            if time.monotonic() > deadline:
                pool.terminate()
                break
    print(f"compiled {done} of {len(launches)} launches in {num_workers} processes in "
          f"{time.monotonic() - start:.0f} s", flush=True)


def _compile_one(fields: tuple) -> bool:
    """Run one launch on a small batch of the same heads, so that it compiles; False if it fails."""
    q, k_cache, v_cache, meta, _, _ = make_batch(1, 512, 512)
    try:
        new_kv = step_kv(k_cache, v_cache, meta)
        prefill_attention(q, k_cache, v_cache, meta, SCALE, PrefillTiles(*fields), new_kv=new_kv)
        torch.cuda.synchronize()
        return True
    except Exception:  # shared memory, registers: the timing run reports it
        return False


class Shape:
    """One shape's batch, SDPA's output and FLOPs."""

    def __init__(self, batch: int, length: int):
        self.label = f"{batch}x{length}"
        self.q, self.k_cache, self.v_cache, self.meta, (q4, k, v), _ = make_batch(batch, length, length)
        self.new_kv = step_kv(self.k_cache, self.v_cache, self.meta)
        self.sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, is_causal=True, enable_gqa=True)
        self.baseline = self.sdpa().transpose(1, 2).reshape(self.q.shape).float()
        self.flops = batch * 4 * NUM_HEADS * HEAD_DIM * length * (length + 1) // 2

    def time(self, tiles: PrefillTiles | None) -> tuple[float, float]:
        """(median ms, max |diff| vs SDPA) of the kernel at ``tiles``; SDPA itself for None."""
        if tiles is None:
            return (graph_ms(self.sdpa) if GRAPH else median_ms(self.sdpa)), 0.0
        fn = lambda: prefill_attention(self.q, self.k_cache, self.v_cache, self.meta, SCALE, tiles,  # noqa: E731
                                       new_kv=self.new_kv)
        err = (fn().float() - self.baseline).abs().max().item()
        return (graph_ms(fn) if GRAPH else median_ms(fn, 2, 10)), err


def time_all(shapes: list[Shape], launches: list[PrefillTiles], peak: float, deadline: float) -> list[dict]:
    rows = []
    for tiles in launches:
        if time.monotonic() > deadline:
            print(f"{name(tiles):<36} skipped: --max-seconds spent", flush=True)
            continue
        try:
            timings = [shape.time(tiles) for shape in shapes]
        except Exception as error:  # a shape that does not fit skips the launch
            print(f"{name(tiles):<36} failed: {type(error).__name__}: {str(error)[:160]}", flush=True)
            continue
        row = dict(tiles=dataclasses.asdict(tiles), name=name(tiles), ms={}, of_peak={}, max_diff={})
        for shape, (ms, err) in zip(shapes, timings):
            row["ms"][shape.label], row["max_diff"][shape.label] = ms, err
            row["of_peak"][shape.label] = shape.flops / (ms * 1e-3) / 1e12 / peak
        timings = "  ".join(f"{s}: {row['ms'][s] * 1e3:8.1f} us {row['of_peak'][s]:6.1%}" for s in row["ms"])
        print(f"{name(tiles):<36} {timings}  max|diff| {max(row['max_diff'].values()):.1e}", flush=True)
        rows.append(row)
    return rows


def mean_of_peak(row: dict) -> float:
    """The ranking of launches: their mean fraction of the matrix rate over the shapes."""
    return sum(row["of_peak"].values()) / len(row["of_peak"])


def print_table(card: str, peak: float, shapes: list[Shape], sdpa: dict, default: PrefillTiles, rows: list[dict]):
    labels = [shape.label for shape in shapes]
    print(f"\n{card}: bf16 matmul {peak:.0f} TFLOP/s; 32 heads / 8 KV heads, head_dim 128, bf16, KV block 16")
    print(f"{'launch':<36} " + " ".join(f"{label + ' us':>11} {'of peak':>8}" for label in labels))

    flops = {shape.label: shape.flops for shape in shapes}

    def line(title: str, ms: dict):
        rates = [flops[label] / (ms[label] * 1e-3) / 1e12 / peak for label in labels]
        print(f"{title:<36} " + " ".join(f"{ms[label] * 1e3:11.1f} {rate:8.1%}" for label, rate in zip(labels, rates)))

    line("sdpa (contiguous KV)", sdpa)
    by_name = {row["name"]: row for row in rows}
    if name(default) in by_name:
        line(f"default {name(default)}", by_name[name(default)]["ms"])
    ranked = sorted(rows, key=mean_of_peak, reverse=True)
    for row in ranked[:8]:
        line(row["name"], row["ms"])
    if ranked:
        best = ranked[0]
        print(f"fastest over {'+'.join(labels)} (mean of peak): {PrefillTiles(**best['tiles'])}, "
              + ", ".join(f"{label} {best['of_peak'][label]:.1%} of peak" for label in labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="batch x prompt length, comma separated")
    parser.add_argument("--max-seconds", type=float, default=200.0, help="stop compiling and timing after this long")
    parser.add_argument("--compile-workers", type=int, default=14, help="processes that compile first (0: none)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    parser.add_argument("--graph", action="store_true", help="time launches as CUDA-graph replays")
    parser.add_argument("--tma-grid", action="store_true", help="the grid reads the step's keys by descriptors")
    args = parser.parse_args()
    global GRAPH
    GRAPH = args.graph
    deadline = time.monotonic() + args.max_seconds
    default = prefill_tiles(HEAD_DIM, GROUP, torch.bfloat16)
    first = [default] + [dataclasses.replace(default, **extra, **switches)
                         for extra in ({}, LONG_KEYS) for switches in CONTIGUOUS]
    coarse = [dataclasses.replace(tiles, contiguous_kv=True, tma_kv=True) for tiles in GRID] if args.tma_grid else GRID
    grid = first + [tiles for tiles in coarse if tiles not in first]
    if args.compile_workers > 0:
        precompile(grid, args.compile_workers, deadline - 0.4 * args.max_seconds)
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0)
    copy_tb_s()  # the first timed work of a process runs slow (clocks, lazy set-up): not measured
    peak = matmul_tflop_s()
    shapes = [Shape(*(int(x) for x in label.split("x"))) for label in args.shapes.split(",")]
    sdpa = {shape.label: shape.time(None)[0] for shape in shapes}
    rows = time_all(shapes, grid, peak, deadline)
    finalists = sorted(rows, key=mean_of_peak, reverse=True)[:NUM_FINALISTS]
    switched = [dataclasses.replace(PrefillTiles(**row["tiles"]), **switches)
                for row in finalists for switches in SWITCHES]
    switched = list(dict.fromkeys(tiles for tiles in switched if tiles not in grid))  # each launch once
    if args.compile_workers > 0 and switched:
        precompile(switched, args.compile_workers, deadline)
    rows += time_all(shapes, switched, peak, deadline)
    if args.out:
        args.out.write_text(json.dumps(dict(card=card, matmul_tflop_s=peak, sdpa_ms=sdpa, rows=rows), indent=1))
    print_table(card, peak, shapes, sdpa, default, rows)


if __name__ == "__main__":
    main()
