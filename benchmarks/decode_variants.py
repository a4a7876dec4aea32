"""The split-KV decode kernel's switches, tiles and split counts on one GPU, timed as CUDA-graph
replays (as decode steps run in the engine), over bf16 and fp8 KV pools.

    python3 benchmarks/decode_variants.py [--decode 1x32768,8x8192,256x1024,1x512] [--kv-cache-dtypes auto,fp8]
        [--graph-max-seq-len 8192] [--max-seconds 150] [--compile-workers 12] [--out variants.json]

Llama-3-8B's attention as in attention_bench.py (32 query heads, 8 KV heads, head_dim 128, bf16 q,
KV block size 16, shuffled block tables, every sequence at the full context). Per pool and shape:
the default launch (``decode_tiles``, ``choose_num_splits``), the same tiles with the splits merged
by a second kernel, the default with its rows' sums added per tile instead of after the last
tile (or the reverse: ``sum_at_end`` switched), and SDPA on contiguous keys and values; then

1. every combination of the switches that set how the cache is read (:func:`switch_combinations`)
   at the default's tile size and split count;
2. the fastest of them with the merge, the grid order and ``sum_at_end`` switched, with its registers capped
   (more programs an SM), with longer splits where a split holds fewer than 4 or 16 tiles, at
   the tile shapes of ``VARIANT_TILES`` (keys x KV heads a program, warps, stages: loads in
   flight per SM), and at other split counts: half, twice and four times the default's, the
   count for the context itself, and those that make whole waves of 1 to 4 programs per SM (the
   tail of the last wave).

Stage 1's kernels, then each shape's stage 2, compile first in worker processes.
``--graph-max-seq-len`` is the metadata's ``max_seq_len`` where the context is shorter, as the
decode graphs set it (the model's length): at 1 x 512 the default then cuts 32 splits of which
few hold keys, as a batch-1 decode step with a short context does. ``--max-seconds`` stops the
timing of stages 1 and 2 (the tables still print): shapes are timed in the order given, each
over both pools. Prints per shape the launches fastest first, then one table: per pool and shape
the default, the merge kernel, the default with ``sum_at_end`` switched, SDPA and the fastest launch, in microseconds and per cent of the
device-to-device copy rate (read + write bytes) measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# attention_bench (beside this file, on the path of a script run from here) puts the repository on the path
import attention_bench as bench
from meshlm.kernels.decode_attention import DecodeTiles, choose_num_splits, decode_tiles, paged_decode_attention

DECODE_SHAPES = "1x32768,8x8192,256x1024,1x512"
# Stage 2's tile shapes: (columns = keys x KV heads a program, warps, stages).
VARIANT_TILES = [(32, 4, 3), (32, 4, 4), (64, 2, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 2, 2), (128, 4, 2),
                 (128, 4, 3), (128, 8, 2)]
# Stage 2's split counts include those giving these many programs per SM (whole waves).
PROGRAMS_PER_SM = (1, 2, 3, 4)
READING_OFF = dict(prefetch_table=0, k_transposed=False, paged_tile=False, heads_first=False, kv_heads_per_program=1,
                   swap_ab=False, min_group_rows=16, fp8_widen="cvt")
# A launch whose output differs more from SDPA's is reported as wrong.
MAX_DIFF = 0.1


def switch_combinations(kv: str) -> list[dict]:
    """Stage 1: with a program per KV head, block ids 0, 1 or 2 tiles ahead x keys transposed or not
    x heads first or not; with 2 or 4 KV heads a program, block ids 0 or 2 ahead x heads first or
    not; with all 8 (a program reads whole cache blocks, 32 KiB each), block ids 0 or 2 ahead; the
    cache tiles as the products' first operand (``swap_ab``) with block ids 0 or 2 ahead x 1 or 2
    KV heads x the group padded to 16 or 8 rows; over an fp8 pool (``kv`` "fp8") also those of 8
    rows with values, or keys and values, loaded as words or keys widened by bit moves (``fp8_widen``).
    (One block-table load per cache block, ``paged_tile``, takes the most registers, up to 255 and
    spills at tiles of 128 columns on sm_90: timed once, in stage 2.)"""
    one_head = [dict(prefetch_table=prefetch, k_transposed=k_transposed, heads_first=heads)
                for prefetch, k_transposed, heads in itertools.product((0, 1, 2), (False, True), (False, True))]
    several = [dict(prefetch_table=prefetch, heads_first=heads, kv_heads_per_program=kv_heads)
               for kv_heads, prefetch, heads in itertools.product((2, 4), (0, 2), (False, True))]
    every = [dict(prefetch_table=prefetch, kv_heads_per_program=bench.NUM_KV_HEADS) for prefetch in (0, 2)]
    swapped = [dict(prefetch_table=prefetch, kv_heads_per_program=kv_heads, swap_ab=True, min_group_rows=rows)
               for prefetch, kv_heads, rows in itertools.product((0, 2), (1, 2), (16, 8))]
    widened = [dict(combo, fp8_widen=widen) for combo in swapped if combo["min_group_rows"] == 8
               for widen in ("words_v", "words", "asm_k")] if kv == "fp8" else []
    return one_head + several + every + swapped + widened


def with_switches(tiles: DecodeTiles, switches: dict) -> DecodeTiles:
    """``tiles`` with its reading switches set to ``switches`` (the others off), as many columns a
    tile: several KV heads a program take as many fewer keys."""
    columns = tiles.block_n * tiles.kv_heads_per_program
    kv_heads = switches.get("kv_heads_per_program", 1)
    return dataclasses.replace(tiles, **{**READING_OFF, **switches, "block_n": max(16, columns // kv_heads)})


def with_columns(tiles: DecodeTiles, columns: int, num_warps: int, num_stages: int) -> DecodeTiles:
    return dataclasses.replace(tiles, block_n=max(16, columns // tiles.kv_heads_per_program), num_warps=num_warps,
                               num_stages=num_stages)


@dataclasses.dataclass
class Shape:
    """One pool and batch x context: ``call(tiles, num_splits)`` makes a run of the decode kernel;
    SDPA's output checks them; ``work`` is the bytes of K and V."""

    kv: str
    batch: int
    context: int
    call: object
    sdpa: object
    baseline: torch.Tensor
    work: int
    tiles: DecodeTiles
    num_splits: int

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.context}"


def make_shape(kv: str, batch: int, context: int, graph_max_seq_len: int, num_sms: int) -> Shape:
    bench.KV_CACHE_DTYPE = kv
    q, k_cache, v_cache, meta, (q4, k, v), scales = bench.make_batch(batch, context, 1)
    meta.max_seq_len = max(context, graph_max_seq_len)

    def call(tiles: DecodeTiles | None = None, num_splits: int | None = None):
        return lambda: paged_decode_attention(q, k_cache, v_cache, meta, bench.SCALE, None, tiles, num_splits,
                                              **scales)

    def sdpa():
        return F.scaled_dot_product_attention(q4, k, v, scale=bench.SCALE, enable_gqa=True)

    baseline = sdpa().transpose(1, 2).reshape(q.shape).float()
    tiles = decode_tiles(q.dtype, batch * bench.NUM_KV_HEADS, num_sms, kv == "fp8", bench.NUM_KV_HEADS)
    num_splits = choose_num_splits(batch, bench.NUM_KV_HEADS, meta.max_seq_len, num_sms)
    return Shape(kv, batch, context, call, sdpa, baseline, bench.decode_bytes(batch, context, k_cache), tiles,
                 num_splits)


def split_counts(shape: Shape, tiles: DecodeTiles, count: int, num_sms: int) -> list[int]:
    """Stage 2's other split counts for the launch (tiles, count)."""
    per_split = shape.batch * bench.NUM_KV_HEADS // tiles.kv_heads_per_program  # programs a split
    counts = {max(1, count // 2), 2 * count, 4 * count,
              choose_num_splits(shape.batch, bench.NUM_KV_HEADS, shape.context, num_sms)}
    counts |= {max(1, round(k * num_sms / per_split)) for k in PROGRAMS_PER_SM}
    return sorted(c for c in counts - {count} if c <= max(1, shape.context // tiles.block_n))


def stage_two(shape: Shape, tiles: DecodeTiles, count: int, num_sms: int) -> list[tuple[DecodeTiles, int]]:
    """Stage 2's launches around the fastest of stage 1, (tiles, count)."""
    launches = [(dataclasses.replace(tiles, paged_tile=True), count),
                (dataclasses.replace(tiles, sum_at_end=not tiles.sum_at_end), count)]
    # registers capped so that 4 or 3 programs of 4 warps (2 of 8) fit an SM
    launches += [(dataclasses.replace(tiles, max_registers=cap), count)
                 for cap in ((128, 168) if tiles.num_warps == 4 else (128,))]
    if count > 1:  # the merge and the order of the splits
        launches += [(dataclasses.replace(tiles, fused_merge=not tiles.fused_merge), count),
                     (dataclasses.replace(tiles, splits_first=not tiles.splits_first), count)]
    split_tiles = -(-shape.context // (count * tiles.block_n))  # tiles a split covers
    launches += [(dataclasses.replace(tiles, min_split_tiles=least), count) for least in (4, 16) if least > split_tiles]
    launches += [(with_columns(tiles, *shape_), count) for shape_ in VARIANT_TILES]
    launches += [(tiles, other) for other in split_counts(shape, tiles, count, num_sms)]
    return list(dict.fromkeys(launch for launch in launches if launch != (tiles, count)))


def time_launch(shape: Shape, label: str, fn, peak: float, deadline: float) -> dict | None:
    """A row for one run timed as graph replays, or None (printed) when it fails or time is up."""
    name = f"{shape.kv:<4} {shape.name:<9} {label:<52}"
    if time.monotonic() > deadline:
        print(f"{name} skipped: --max-seconds spent", flush=True)
        return None
    try:
        out = fn()
        out = out.transpose(1, 2) if out.dim() == 4 else out  # SDPA: [batch, heads, 1, dim]
        diff = (out.reshape(shape.baseline.shape).float() - shape.baseline).abs().max().item()
        ms = bench.graph_ms(fn, calls=8, replays=8)
    except Exception as error:  # a tile that does not fit (shared memory, registers)
        print(f"{name} failed: {type(error).__name__}: {str(error)[:160]}", flush=True)
        return None
    of_copy = shape.work / (ms * 1e-3) / 1e12 / peak
    print(f"{name} {ms * 1e3:8.1f} us {of_copy:6.1%} of copy  max |diff| vs sdpa {diff:.1e}"
          + ("  WRONG" if diff > MAX_DIFF else ""), flush=True)
    return dict(kv=shape.kv, shape=shape.name, label=label, us=ms * 1e3, of_copy=of_copy, max_diff=diff,
                is_wrong=diff > MAX_DIFF)


def launch_row(shape: Shape, tiles: DecodeTiles, count: int, peak: float, deadline: float, label: str = ""):
    row = time_launch(shape, label or bench.decode_name(tiles, count), shape.call(tiles, count), peak, deadline)
    if row is not None:
        row.update(tiles=dataclasses.asdict(tiles), num_splits=count)
    return row


def bench_shape(shape: Shape, pool, peak: float, num_sms: int, deadline: float) -> dict:
    """The default, the merge kernel, SDPA, stage 1 and stage 2 of one shape."""
    fixed = {"default": time_launch(shape, "default " + bench.decode_name(shape.tiles, shape.num_splits),
                                    shape.call(), peak, float("inf")),
             "merge kernel": launch_row(shape, dataclasses.replace(shape.tiles, fused_merge=False), shape.num_splits,
                                        peak, float("inf"), "default, merge kernel"),
             "sum switched": launch_row(shape, dataclasses.replace(shape.tiles, sum_at_end=not shape.tiles.sum_at_end),
                                        shape.num_splits, peak, float("inf"),
                                        f"default, sum_at_end={not shape.tiles.sum_at_end}"),
             "sdpa": time_launch(shape, "sdpa (contiguous KV)", shape.sdpa, peak, float("inf"))}
    variants = [launch_row(shape, with_switches(shape.tiles, switches), shape.num_splits, peak, deadline)
                for switches in switch_combinations(shape.kv)]
    variants = [row for row in variants if row is not None and not row["is_wrong"]]
    if variants and time.monotonic() < deadline:
        best = min(variants, key=lambda row: row["us"])
        tiles, count = DecodeTiles(**best["tiles"]), best["num_splits"]
        launches = stage_two(shape, tiles, count, num_sms)
        compile_launches(pool, [(shape.kv, launch) for launch in launches])
        variants += filter(None, (launch_row(shape, *launch, peak, deadline) for launch in launches))
    return dict(fixed=fixed, variants=[row for row in variants if not row["is_wrong"]])


def compile_launches(pool, jobs: list[tuple[str, tuple[DecodeTiles, int]]]) -> None:
    """Run each (pool, (tiles, split count)) once in the worker processes, which leaves its kernels
    in Triton's on-disk cache for this process to load."""
    if pool is None or not jobs:
        return
    start = time.monotonic()
    jobs = list(dict.fromkeys((kv, dataclasses.astuple(tiles), count) for kv, (tiles, count) in jobs))
    failed = sum(pool.starmap(_compile, jobs, chunksize=1))
    print(f"compiled {len(jobs)} launches in {time.monotonic() - start:.0f} s ({failed} failed; they fail again, "
          "with the error, when timed)", flush=True)


def _compile(kv: str, fields: tuple, num_splits: int) -> int:
    """1 if the launch fails on a small batch, else 0 (a worker process)."""
    bench.KV_CACHE_DTYPE = kv
    try:
        q, k_cache, v_cache, meta, _, scales = bench.make_batch(2, 256, 1)
        paged_decode_attention(q, k_cache, v_cache, meta, bench.SCALE, None, DecodeTiles(*fields), num_splits,
                               **scales)
        torch.cuda.synchronize()
        return 0
    except Exception:  # shared memory, registers: the timing run reports it
        return 1


def print_shape(shape: Shape, result: dict) -> None:
    print(f"\n{shape.kv} KV, decode {shape.name}: launches fastest first (default "
          f"{bench.decode_name(shape.tiles, shape.num_splits)})")
    for row in sorted(result["variants"], key=lambda row: row["us"])[:12]:
        print(f"  {row['label']:<56} {row['us']:8.1f} us {row['of_copy']:6.1%}")


def print_table(card: str, copy_rate: float, results: list[tuple[Shape, dict]]) -> None:
    print(f"\n{card}: copy {copy_rate:.2f} TB/s (read + write); bf16 q, 32 heads / 8 KV heads, head_dim 128, "
          "block 16; CUDA-graph replays; % of copy")
    print(f"{'pool':<5} {'shape':<9} {'default':>17} {'merge kernel':>17} {'sum_at_end flip':>17} "
          f"{'sdpa':>17} {'fastest':>17}  launch")
    for shape, result in results:
        cells = [result["fixed"][name] for name in ("default", "merge kernel", "sum switched", "sdpa")]
        best = min(result["variants"], key=lambda row: row["us"], default=None)
        text = " ".join(f"{row['us']:7.1f} us {row['of_copy']:6.1%}" if row else f"{'-':>17}" for row in
                        [*cells, best])
        print(f"{shape.kv:<5} {shape.name:<9} {text}  {best['label'] if best else '-'}")
    for shape, result in results:
        best = min(result["variants"], key=lambda row: row["us"], default=None)
        if best is not None:
            print(f"{shape.kv:<5} {shape.name:<9} num_splits={best['num_splits']} {DecodeTiles(**best['tiles'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", default=DECODE_SHAPES, help="batch x context, comma separated")
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8", help="auto (bf16) and/or fp8, comma separated")
    parser.add_argument("--graph-max-seq-len", type=int, default=8192,
                        help="max_seq_len of the metadata where the context is shorter (the decode graphs')")
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop timing stages 1 and 2 after this")
    parser.add_argument("--compile-workers", type=int, default=12, help="processes that compile first (0: none)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    pool = multiprocessing.get_context("spawn").Pool(args.compile_workers) if args.compile_workers else None
    torch.manual_seed(0)
    card, num_sms = torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).multi_processor_count
    bench.copy_tb_s()  # the first timed work of a process runs slow (clocks, lazy set-up): not measured
    copy_rate = bench.copy_tb_s()
    print(f"{card}: device-to-device copy {copy_rate:.2f} TB/s (read + write)", flush=True)
    cases = [(kv, *bench.batch_x_length(shape)) for shape in args.decode.split(",")  # the first shapes first
             for kv in args.kv_cache_dtypes.split(",")]
    jobs = []
    for kv, batch, context in cases:  # stage 1 of every shape, and the defaults, compile first
        tiles = decode_tiles(torch.bfloat16, batch * bench.NUM_KV_HEADS, num_sms, kv == "fp8", bench.NUM_KV_HEADS)
        count = choose_num_splits(batch, bench.NUM_KV_HEADS, max(context, args.graph_max_seq_len), num_sms)
        jobs += [(kv, (tiles, count)), (kv, (dataclasses.replace(tiles, fused_merge=False), count)),
                 (kv, (dataclasses.replace(tiles, sum_at_end=not tiles.sum_at_end), count))]
        jobs += [(kv, (with_switches(tiles, switches), count)) for switches in switch_combinations(kv)]
    compile_launches(pool, jobs)
    results = []
    for kv, batch, context in cases:
        shape = make_shape(kv, batch, context, args.graph_max_seq_len, num_sms)
        results.append((shape, bench_shape(shape, pool, copy_rate, num_sms, deadline)))
        print_shape(*results[-1])
        del shape.call, shape.sdpa  # the shape's tensors
        torch.cuda.empty_cache()
    if pool is not None:
        pool.close()
    if args.out:
        rows = [dict(kv=s.kv, shape=s.name, **r) for s, r in results]
        args.out.write_text(json.dumps(dict(card=card, copy_tb_s=copy_rate, results=rows), indent=1, default=str))
    print_table(card, copy_rate, results)


if __name__ == "__main__":
    main()
