"""Paged attention on one GPU against the card's limits: decode (the split-KV decode kernel, the
unified kernel) against the copy bandwidth, prefill (the unified kernel) against the bf16 matrix
rate; PyTorch SDPA and compiled flex attention on the same keys and values, laid out
contiguously, as baselines.

    python3 benchmarks/attention_bench.py [--decode 1x32768,8x8192] [--prefill 1x2048] [--sweep] [--out a.json]

Llama-3-8B's attention on one GPU: 32 query heads, 8 KV heads, head_dim 128, bf16, KV block size
16, block tables shuffled. Decode: every sequence of the batch at the full context; "GB" is the
keys and values a step must read, "of peak" the rate of reading them against the device-to-device
copy rate (read + write bytes). Prefill: fresh prompts of the given length, causal; "TFLOP" counts
the two matrix products over the causal triangle (4 x heads x head_dim x L(L+1)/2 a sequence),
"of peak" their rate against a bf16 8192^3 matmul. Copy and matmul rates are measured in the same
run. Each timing is the median of CUDA-event times after a warm-up. ``--sweep`` also times the
decode kernel at other tiles and split counts and the unified kernel at other tiles, and prints
the fastest of each per shape. ``--variants`` times combinations of the decode kernel's switches
(``DecodeTiles``: prefetch_table, k_transposed, paged_tile, heads_first, kv_heads_per_program,
swap_ab, min_group_rows, fp8_widen, fp8_qk) at
the shape's tiles and split count, then the fastest combination at other split counts and tiles,
and prints per shape the best time of each combination and the fastest of all; the kernels
compile first in parallel worker processes. ``--graph`` times every run as replays of a CUDA graph of it
(the GPU's time alone, as decode steps run in the engine; without it, host launch overhead shows
in short runs such as 1 x 32k); the default decode kernel is then also timed without a graph.
Prints one table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.kernels.attention import AttentionMetadata  # noqa: E402
from meshlm.kernels.attention_tiles import UnifiedTiles, unified_tiles  # noqa: E402
from meshlm.kernels.decode_attention import (  # noqa: E402
    DecodeTiles, choose_num_splits, decode_tiles, paged_decode_attention)
from meshlm.kernels.kv_quant import FP8_KV_MAX, dequantize_kv, quantize_kv  # noqa: E402
from meshlm.kernels.triton_attention import unified_attention  # noqa: E402

DECODE_SHAPES = "1x32768,8x8192,64x2048,256x1024,1024x256"
PREFILL_SHAPES = "1x2048,4x8192,1x32768"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
GROUP = NUM_HEADS // NUM_KV_HEADS
SCALE = HEAD_DIM ** -0.5
DECODE_SWEEP = [DecodeTiles(n, w, s) for n, w, s in itertools.product((32, 64, 128, 256), (4, 8), (2, 3, 4))]
PREFILL_SWEEP = [UnifiedTiles(m, n, w, s) for m, n, w, s in
                 itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
# The decode kernel's switches (DecodeTiles fields): their short names in the printout and the values timed.
SWITCHES = {"prefetch_table": "prefetch", "k_transposed": "ktrans", "paged_tile": "paged", "heads_first": "heads",
            "kv_heads_per_program": "kvheads", "swap_ab": "swap", "min_group_rows": "rows", "fp8_widen": "widen",
            "fp8_qk": "fp8qk"}
SWITCHES_OFF = DecodeTiles(16, 4, 2)
# The fastest combination of switches is also timed at these tiles (tile columns = KV heads per
# program x keys, warps, stages) and at other split counts.
VARIANT_TILES = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 4, 4), (256, 4, 2), (256, 8, 2)]


def median_ms(fn, warmup: int = 5, iters: int = 25) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, calls: int = 10, replays: int = 10) -> float:
    """One call of ``fn``, timed as replays of a CUDA graph of ``calls`` calls: the GPU's time
    without the host's launch overhead (decode steps run as graphs in the engine)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_ms(graph.replay, warmup=2, iters=replays) / calls


def copy_tb_s(num_bytes: int = 2**31) -> float:
    """Device-to-device copy, counting read + write bytes."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters=20)
    return 2 * num_bytes / (ms * 1e-3) / 1e12


def matmul_tflop_s(n: int = 8192) -> float:
    """A bf16 n x n x n matmul (cuBLAS), in TFLOP/s."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# "fp8": the caches in float8 e4m3 with per-head scales (each head's largest value maps to 448);
# SDPA and flex then read the dequantized bf16 keys and values. Set by --kv-cache-dtype.
KV_CACHE_DTYPE = "auto"
# When sweep and variant runs stop being timed (time.monotonic()); set by --max-seconds.
DEADLINE = float("inf")


def make_batch(batch: int, context: int, query_len: int):
    """Each sequence: ``context`` keys in a paged cache (shuffled tables), its last ``query_len``
    tokens as queries. Returns q [batch * query_len, heads, dim], the caches, the metadata,
    q, k, v laid out for SDPA ([batch, heads, tokens, dim]) and the kernels' scale arguments."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).int()
    q = torch.randn(batch * query_len, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scales = {}
    if KV_CACHE_DTYPE == "fp8":
        scales = {name: cache.abs().amax((0, 1, 3)).float() / FP8_KV_MAX  # [kv_heads]
                  for name, cache in (("k_scale", k_cache), ("v_scale", v_cache))}
        k_cache = quantize_kv(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM), scales["k_scale"]).view(shape)
        v_cache = quantize_kv(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM), scales["v_scale"]).view(shape)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    positions = torch.arange(context - query_len, context, device="cuda").repeat(batch)
    meta = AttentionMetadata(
        positions=positions, slot_mapping=torch.zeros(batch * query_len, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.arange(0, batch * query_len + 1, query_len, dtype=torch.int32, device="cuda"),
        seq_lens=seq_lens, block_tables=tables, max_query_len=query_len, max_seq_len=context,
        query_lens_host=np.full(batch, query_len, np.int64))

    def contiguous(cache, scale_name):  # [batch, kv_heads, context, dim] in bf16
        if scales:
            cache = dequantize_kv(cache, scales[scale_name]).to(torch.bfloat16)
        return cache[tables.long()].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()

    q4 = q.view(batch, query_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()  # [batch, heads, q, dim]
    return q, k_cache, v_cache, meta, (q4, contiguous(k_cache, "k_scale"), contiguous(v_cache, "v_scale")), scales


def flex_fn(q4, k, v, is_causal: bool):
    """Compiled flex attention on the contiguous layout, or None (printed) where it does not run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        compiled = torch.compile(flex_attention, dynamic=False)
        mask = None
        if is_causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                     q4.shape[2], k.shape[2], device="cuda")
        fn = lambda: compiled(q4, k, v, block_mask=mask, scale=SCALE, enable_gqa=True)  # noqa: E731
        fn()
        return fn
    except Exception as error:  # torch versions without it, shapes it refuses
        print(f"flex attention does not run here: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return None


@dataclasses.dataclass
class Case:
    """One shape's runs (name -> a function of no arguments), SDPA's output they are checked against,
    and its work (decode: bytes of K and V; prefill: FLOPs). Decode also has ``call(tiles,
    num_splits)``, which makes a run of the decode kernel, and the launch of each variant run."""

    runs: dict
    baseline: torch.Tensor
    work: int
    call: Callable | None = None
    launches: dict = dataclasses.field(default_factory=dict)  # name -> (DecodeTiles, num_splits)


def decode_runs(batch: int, context: int, opts: argparse.Namespace) -> Case:
    q, k_cache, v_cache, meta, (q4, k, v), scales = make_batch(batch, context, 1)
    tiles, splits = default_decode_shape(batch, context)

    def call(tiles: DecodeTiles | None = None, num_splits: int | None = None):
        return lambda: paged_decode_attention(q, k_cache, v_cache, meta, SCALE, None, tiles, num_splits, **scales)

    runs = {f"decode {_decode_name(tiles, splits)}": call(),
            f"unified {_unified_name(unified_tiles(HEAD_DIM, GROUP, 1, q.dtype))}": lambda: unified_attention(
                q, k_cache, v_cache, meta, SCALE, **scales),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, enable_gqa=True)}
    flex = flex_fn(q4, k, v, is_causal=False) if not opts.skip_flex else None
    if flex is not None:
        runs["flex (compiled)"] = flex
    if opts.sweep:
        split_counts = sorted({max(1, splits // 2), splits, 2 * splits, 4 * splits})
        for sweep_tiles, count in itertools.product(DECODE_SWEEP, split_counts):
            runs[f"sweep decode {_decode_name(sweep_tiles, count)}"] = call(sweep_tiles, count)
    launches = {}
    if opts.variants:
        for switches in switch_combinations():
            variant = with_switches(tiles, switches)
            launches[f"variant {_decode_name(variant, splits)}"] = (variant, splits)
            runs[f"variant {_decode_name(variant, splits)}"] = call(variant, splits)
    baseline = runs["sdpa"]().transpose(1, 2).reshape(q.shape).float()
    work = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()  # K and V bytes
    return Case(runs, baseline, work, call, launches)


def default_decode_shape(batch: int, context: int, kv_fp8: bool = False) -> tuple[DecodeTiles, int]:
    """The tiles and split count the decode kernel picks for a batch at full context (bf16 q)."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    return (decode_tiles(torch.bfloat16, batch * NUM_KV_HEADS, num_sms, kv_fp8, NUM_KV_HEADS),
            choose_num_splits(batch, NUM_KV_HEADS, context, num_sms))


def switch_combinations() -> list[dict]:
    """The combinations of the decode kernel's switches that --variants times, all off first: every
    one with a program per KV head; with 2 or 4 KV heads a program, those of prefetch_table 0 / 2,
    paged_tile and heads_first; swap_ab with prefetch_table 0 / 2, 1 or 2 KV heads and 16 or 8 rows;
    over an fp8 pool also float8 widenings (fp8_widen: keys by bit moves, values as words) on a
    few of them, and q in float8 (fp8_qk, which changes the result: see max |diff| vs sdpa)."""
    one_head = [dict(prefetch_table=prefetch, k_transposed=k_transposed, paged_tile=paged, heads_first=heads)
                for prefetch, k_transposed, paged, heads in itertools.product((0, 1, 2), *[(False, True)] * 3)]
    several = [dict(prefetch_table=prefetch, paged_tile=paged, heads_first=heads, kv_heads_per_program=kv_heads)
               for kv_heads, prefetch, paged, heads in itertools.product((2, 4), (0, 2), *[(False, True)] * 2)]
    swapped = [dict(prefetch_table=prefetch, k_transposed=False, kv_heads_per_program=kv_heads, swap_ab=True,
                    min_group_rows=rows) for prefetch, kv_heads, rows in itertools.product((0, 2), (1, 2), (16, 8))]
    if KV_CACHE_DTYPE != "fp8":
        return one_head + several + swapped
    bases = [dict(prefetch_table=prefetch, k_transposed=k_transposed) for prefetch, k_transposed in
             ((0, False), (1, False), (2, False), (2, True))] + [dict(prefetch_table=2, kv_heads_per_program=2)]
    widened = ([dict(base, fp8_widen=widen) for base in bases for widen in ("asm_k", "words_v")]
               + [dict(combo, fp8_widen=widen) for combo in swapped for widen in ("asm_k", "words_v")
                  if combo["min_group_rows"] == 8 or widen == "words_v"])
    fp8_queries = [dict(swapped[i], fp8_qk=True, fp8_widen="words_v") for i in (4, 5, 6)]  # prefetch 2
    return one_head + several + swapped + widened + fp8_queries


def with_switches(tiles: DecodeTiles, switches: dict) -> DecodeTiles:
    """``tiles`` with ``switches`` on; several KV heads a program take as many fewer keys a tile,
    so that a tile holds as many rows of the cache."""
    kv_heads = switches.get("kv_heads_per_program", 1)
    return dataclasses.replace(tiles, block_n=max(16, tiles.block_n // kv_heads), **switches)


def prefill_runs(batch: int, length: int, opts: argparse.Namespace) -> Case:
    q, k_cache, v_cache, meta, (q4, k, v), scales = make_batch(batch, length, length)
    runs = {f"unified {_unified_name(unified_tiles(HEAD_DIM, GROUP, length, q.dtype))}": lambda: unified_attention(
                q, k_cache, v_cache, meta, SCALE, **scales),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, is_causal=True, enable_gqa=True)}
    flex = flex_fn(q4, k, v, is_causal=True) if not opts.skip_flex else None
    if flex is not None:
        runs["flex (compiled)"] = flex
    if opts.sweep:
        for tiles in PREFILL_SWEEP:
            runs[f"sweep unified {_unified_name(tiles)}"] = (
                lambda t=tiles: unified_attention(q, k_cache, v_cache, meta, SCALE, None, tiles=t, **scales))
    baseline = runs["sdpa"]().transpose(1, 2).reshape(q.shape).float()
    return Case(runs, baseline, batch * 4 * NUM_HEADS * HEAD_DIM * length * (length + 1) // 2)  # FLOPs


def _decode_name(tiles: DecodeTiles, splits: int) -> str:
    return f"n{tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s x{splits}{_switches_name(dataclasses.asdict(tiles))}"


def _switches_name(fields: dict) -> str:
    """'+prefetch2+heads+kvheads2' for the switches that are on among DecodeTiles ``fields``; '' if none."""
    return "".join(f"+{short}{'' if fields[name] is True else fields[name]}"
                   for name, short in SWITCHES.items() if fields[name] != getattr(SWITCHES_OFF, name))


def _unified_name(tiles: UnifiedTiles) -> str:
    return f"m{tiles.block_m}/n{tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s"


def bench_shape(kind: str, batch: int, length: int, peak: float, opts: argparse.Namespace) -> list[dict]:
    """Time every run of one shape; ``peak`` is the copy rate (TB/s, decode) or matmul rate (TFLOP/s)."""
    case = (decode_runs if kind == "decode" else prefill_runs)(batch, length, opts)
    shape = dict(kind=kind, shape=f"{batch}x{length}", work=case.work, peak=peak, baseline=case.baseline)
    rows = []
    for name, fn in case.runs.items():
        rows += time_run(shape, name, fn, opts.graph and name != "flex (compiled)", case.launches.get(name))
        if opts.graph and name.startswith("decode "):  # the launch overhead a graph hides
            rows += time_run(shape, f"{name} (no graph)", fn, False)
    variants = [row for row in rows if "launch" in row]
    if variants:  # the fastest combination of switches at other split counts, then at other tiles
        launch = min(variants, key=lambda r: r["ms"])["launch"]
        tiles, count = DecodeTiles(**launch["tiles"]), launch["num_splits"]
        others = [(tiles, other_count) for other_count in sorted({max(1, count // 2), 2 * count, 4 * count} - {count})]
        for columns, num_warps, num_stages in VARIANT_TILES:
            block_n = max(16, columns // tiles.kv_heads_per_program)
            others.append((dataclasses.replace(tiles, block_n=block_n, num_warps=num_warps, num_stages=num_stages),
                           count))
        for other, other_count in dict.fromkeys(o for o in others if o != (tiles, count)):
            rows += time_run(shape, f"variant {_decode_name(other, other_count)}", case.call(other, other_count),
                             opts.graph, (other, other_count))
    return rows


def time_run(shape: dict, name: str, fn, graph: bool, launch: tuple | None = None) -> list[dict]:
    """[one row] for the run ``fn`` of ``shape``, or [] when it fails or the time budget is spent;
    a variant's row keeps its ``launch`` (tiles, split count)."""
    kind, batch_x_length, work, peak = shape["kind"], shape["shape"], shape["work"], shape["peak"]
    is_swept = name.startswith(("sweep", "variant"))
    if is_swept and time.monotonic() > DEADLINE:
        print(f"{kind} {batch_x_length:<11} {name:<44} skipped: --max-seconds spent", flush=True)
        return []
    try:
        out = fn()
        out = out.transpose(1, 2) if out.dim() == 4 else out  # SDPA and flex: [batch, heads, q, dim]
        err = (out.reshape(shape["baseline"].shape).float() - shape["baseline"]).abs().max().item()
        ms = graph_ms(fn) if graph else median_ms(fn, *((2, 10) if is_swept else ()))
    except Exception as error:  # a tile that does not fit (shared memory) skips, not stops, the run
        print(f"{kind} {batch_x_length:<11} {name:<44} failed: {type(error).__name__}: {str(error)[:200]}",
              flush=True)
        return []
    unit = "TB/s" if kind == "decode" else "TFLOP/s"
    rate = work / (ms * 1e-3) / 1e12
    print(f"{kind:7} {batch_x_length:<11} {name:<44} {ms * 1e3:10.1f} us {rate:7.2f} {unit:7} "
          f"{rate / peak:6.1%} of peak  max |diff| vs sdpa {err:.2e}", flush=True)
    row = dict(kind=kind, shape=batch_x_length, kernel=name, ms=ms, work=work / 1e9, rate=rate, unit=unit,
               of_peak=rate / peak, max_diff_vs_sdpa=err, timing="graph" if graph else "eager")
    if launch is not None:
        row["launch"] = dict(tiles=dataclasses.asdict(launch[0]), num_splits=launch[1])
    return [row]


def print_table(card: str, copy_rate: float, matmul_rate: float, rows: list[dict]) -> None:
    print(f"\n{card}: copy {copy_rate:.2f} TB/s, bf16 matmul {matmul_rate:.0f} TFLOP/s; bf16 q, "
          f"{'fp8 e4m3' if KV_CACHE_DTYPE == 'fp8' else 'bf16'} KV, 32 heads / 8 KV heads, head_dim 128, block 16"
          + ("; timed as CUDA-graph replays unless '(no graph)'" if any(r["timing"] == "graph" for r in rows) else ""))
    print(f"{'kind':<8} {'shape':<10} {'kernel':<36} {'us':>10} {'GB|TFLOP':>9} {'rate':>8} {'unit':<7} {'of peak':>8}")
    for row in rows:
        if not row["kernel"].startswith(("sweep", "variant")):
            print(f"{row['kind']:<8} {row['shape']:<10} {row['kernel']:<36} {row['ms'] * 1e3:10.1f} "
                  f"{row['work']:9.3f} {row['rate']:8.2f} {row['unit']:<7} {row['of_peak']:8.1%}")
    swept = [row for row in rows if row["kernel"].startswith("sweep")]
    if swept:
        print("\nfastest swept configuration per shape (paste as defaults: decode_tiles / choose_num_splits, "
              "unified_tiles):")
        for (kind, shape), group in itertools.groupby(swept, key=lambda r: (r["kind"], r["shape"])):
            best = min(group, key=lambda r: r["ms"])
            print(f"{kind:<8} {shape:<10} {best['kernel'].removeprefix('sweep '):<36} {best['ms'] * 1e3:10.1f} us "
                  f"{best['of_peak']:6.1%} of peak")
    print_variants([row for row in rows if "launch" in row])


def print_variants(rows: list[dict]) -> None:
    """Per decode shape: each combination of switches at its best tiles and split count, fastest
    first, then the fastest of all."""
    fastest = []
    for shape, group in itertools.groupby(rows, key=lambda r: r["shape"]):
        best = {}
        for row in group:
            switches = _switches_name(row["launch"]["tiles"])
            if switches not in best or row["ms"] < best[switches]["ms"]:
                best[switches] = row
        print(f"\nswitch combinations, decode {shape} ({KV_CACHE_DTYPE} KV; each at its best tiles and "
              "splits, fastest first):")
        for switches, row in sorted(best.items(), key=lambda item: item[1]["ms"]):
            print(f"  {shape:<10} {switches.removeprefix('+') or 'none (the kernel as it is)':<28} "
                  f"{row['kernel'].removeprefix('variant '):<44} {row['ms'] * 1e3:9.1f} us "
                  f"{row['of_peak']:6.1%} of peak")
        fastest.append(min(best.values(), key=lambda r: r["ms"]))
    if fastest:
        print(f"\nfastest decode variant per shape ({KV_CACHE_DTYPE} KV; DecodeTiles fields to paste as "
              "defaults into decode_tiles / choose_num_splits):")
        for row in fastest:
            launch = row["launch"]
            print(f"decode   {row['shape']:<10} {row['ms'] * 1e3:9.1f} us {row['of_peak']:6.1%} of peak  "
                  f"num_splits={launch['num_splits']} {DecodeTiles(**launch['tiles'])}")


def precompile_variants(decode_shapes: list[tuple[int, int]], num_workers: int) -> None:
    """Compile the launches of the decode kernel that ``--variants`` times first (each combination
    of switches at the shapes' own tiles, split and, where the shape's split count is 1, not) in
    worker processes, into Triton's on-disk cache, which this process then reads instead of
    compiling them one at a time. The fastest combination's other tiles compile as they run."""
    jobs = set()
    for batch, context in decode_shapes:
        tiles, splits = default_decode_shape(batch, context)
        for switches, count in itertools.product(switch_combinations(), {min(splits, 2), 2}):
            jobs.add((dataclasses.astuple(with_switches(tiles, switches)), count))  # compiles split or not
    jobs = sorted(jobs)
    start = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        failed = sum(pool.starmap(_compile_worker, [(KV_CACHE_DTYPE, jobs[i::num_workers])
                                                    for i in range(num_workers)]))
    print(f"compiled {len(jobs)} decode launches in {num_workers} processes in {time.monotonic() - start:.0f} s "
          f"({failed} failed; they fail again, with the error, when timed)", flush=True)


def _compile_worker(kv_cache_dtype: str, jobs: list[tuple[tuple, int]]) -> int:
    """Run each (DecodeTiles fields, split count) once on a small batch; returns how many failed."""
    global KV_CACHE_DTYPE
    KV_CACHE_DTYPE = kv_cache_dtype
    q, k_cache, v_cache, meta, _, scales = make_batch(2, 256, 1)
    failed = 0
    for fields, num_splits in jobs:
        try:
            paged_decode_attention(q, k_cache, v_cache, meta, SCALE, None, DecodeTiles(*fields), num_splits,
                                   **scales)
        except Exception:  # shared memory, registers: the timing run reports it
            failed += 1
    torch.cuda.synchronize()
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", default=DECODE_SHAPES, help="batch x context, comma separated ('' for none)")
    parser.add_argument("--prefill", default=PREFILL_SHAPES, help="batch x prompt length, comma separated ('' for none)")
    parser.add_argument("--sweep", action="store_true", help="also time other tiles and split counts")
    parser.add_argument("--skip-flex", action="store_true", help="no flex attention (it compiles once per shape)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: bf16 keys and values; fp8: float8 e4m3 with per-head scales")
    parser.add_argument("--variants", action="store_true",
                        help="also time combinations of the decode kernel's switches (DecodeTiles; switch_combinations)")
    parser.add_argument("--graph", action="store_true", help="time every run as replays of a CUDA graph")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop timing sweep and variant runs after this many seconds (the tables still print)")
    parser.add_argument("--compile-workers", type=int, default=12,
                        help="processes that compile the --variants launches first (0: compile as they run)")
    args = parser.parse_args()
    global KV_CACHE_DTYPE, DEADLINE
    KV_CACHE_DTYPE = args.kv_cache_dtype
    DEADLINE = time.monotonic() + args.max_seconds
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # flex attention compiles once per shape
    card = torch.cuda.get_device_name(0)
    copy_tb_s()  # the first timed work of a process runs slow (clocks, lazy set-up): not measured
    copy_rate, matmul_rate = copy_tb_s(), matmul_tflop_s()
    print(f"{card}: device-to-device copy {copy_rate:.2f} TB/s (read + write), bf16 matmul "
          f"{matmul_rate:.0f} TFLOP/s", flush=True)
    if args.variants and args.compile_workers > 0:
        precompile_variants([_batch_x_length(shape) for shape in filter(None, args.decode.split(","))],
                            args.compile_workers)
    rows = []
    for kind, shapes, peak in (("decode", args.decode, copy_rate), ("prefill", args.prefill, matmul_rate)):
        for shape in filter(None, shapes.split(",")):
            rows += bench_shape(kind, *_batch_x_length(shape), peak, args)
            torch.cuda.empty_cache()  # the shape's tensors are gone: give their memory back
    if args.out:
        args.out.write_text(json.dumps(dict(card=card, copy_tb_s=copy_rate, matmul_tflop_s=matmul_rate,
                                            kv_cache_dtype=args.kv_cache_dtype, rows=rows), indent=1))
    print_table(card, copy_rate, matmul_rate, rows)


def _batch_x_length(shape: str) -> tuple[int, int]:
    batch, length = (int(x) for x in shape.split("x"))
    return batch, length


if __name__ == "__main__":
    main()
