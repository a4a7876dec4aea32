"""Paged attention on one GPU against the card's limits: decode (the split-KV decode kernel, the
unified kernel) against the copy bandwidth, prefill (the kernel the engine dispatches to, given the
step's own keys and values as the engine's attention layer gives them; the prefill kernel for long
prompts, and the unified kernel; below the engine's threshold for the prefill kernel it is timed
too, "(direct)", to place that threshold, and so are its ways of reading the step's own keys apart
from the pool, contiguous_kv and tma_kv, where the default leaves them off) against the bf16 matrix
rate; PyTorch SDPA and compiled flex attention on the same keys and values, laid out contiguously,
as baselines.

    python3 benchmarks/attention_bench.py [--decode 1x32768,8x8192] [--prefill 1x2048] [--sweep] [--out a.json]

Llama-3-8B's attention on one GPU: 32 query heads, 8 KV heads, head_dim 128, bf16, KV block size
16, block tables shuffled. Decode: every sequence of the batch at the full context; "GB" is the
keys and values a step must read, "of peak" the rate of reading them against the device-to-device
copy rate (read + write bytes). Prefill: fresh prompts of the given length, causal; "TFLOP" counts
the two matrix products over the causal triangle (4 x heads x head_dim x L(L+1)/2 a sequence),
"of peak" their rate against a bf16 8192^3 matmul. Copy and matmul rates are measured in the same
run. Each timing is the median of CUDA-event times after a warm-up. ``--sweep`` also times the
decode kernel at other tiles and split counts and the unified kernel at other tiles, and prints
the fastest of each per shape. ``--graph`` times every run as replays of a CUDA graph of it (the
GPU's time alone, as decode steps run in the engine; without it, host launch overhead shows in
short runs such as 1 x 32k); the default decode kernel is then also timed without a graph.
``decode_variants.py`` times the decode kernel's switches. Prints one table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.kernels.attention import AttentionMetadata  # noqa: E402
from meshlm.kernels.attention_tiles import UnifiedTiles, unified_tiles  # noqa: E402
from meshlm.kernels.decode_attention import (  # noqa: E402
    DecodeTiles, choose_num_splits, decode_tiles, paged_decode_attention)
from meshlm.kernels.kv_quant import FP8_KV_MAX, dequantize_kv, quantize_kv  # noqa: E402
from meshlm.kernels.prefill_attention import default_tiles, prefill_attention  # noqa: E402
from meshlm.kernels.prefill_tiles import PrefillTiles, prefill_tiles, uses_prefill_kernel  # noqa: E402
from meshlm.kernels.triton_attention import paged_attention_triton, unified_attention  # noqa: E402

DECODE_SHAPES = "1x32768,8x8192,64x2048,256x1024,1024x256"
PREFILL_SHAPES = "1x2048,1x8192,4x8192,1x32768"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
GROUP = NUM_HEADS // NUM_KV_HEADS
SCALE = HEAD_DIM ** -0.5
DECODE_SWEEP = [DecodeTiles(n, w, s) for n, w, s in itertools.product((32, 64, 128, 256), (4, 8), (2, 3, 4))]
PREFILL_SWEEP = [UnifiedTiles(m, n, w, s) for m, n, w, s in
                 itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
# The decode kernel's switches (DecodeTiles fields) and their short names in the printout.
SWITCHES = {"prefetch_table": "prefetch", "k_transposed": "ktrans", "paged_tile": "paged", "heads_first": "heads",
            "kv_heads_per_program": "kvheads", "splits_first": "splitsfirst", "fused_merge": "fused",
            "min_split_tiles": "minsplit", "max_registers": "maxreg", "swap_ab": "swap", "min_group_rows": "rows",
            "fp8_widen": "widen", "fp8_qk": "fp8qk", "sum_at_end": "sumatend", "tma_kv": "tma"}
SWITCHES_OFF = DecodeTiles(16, 4, 2)
# The prefill kernel's ways to read the step's own keys apart from the pool (PrefillTiles fields):
# pointer loads, and tensor-descriptor (TMA) loads.
CONTIGUOUS_SWITCHES = (dict(contiguous_kv=True, tma_kv=False), dict(contiguous_kv=True, tma_kv=True))


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
# When sweep runs stop being timed (time.monotonic()); set by --max-seconds.
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


def step_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> tuple:
    """The step's own keys and values [num_tokens, kv_heads, dim] (read back from the cache at the
    queries' positions) as the engine's attention layer passes them: the rotated keys in a tensor
    of their own, the values a view of the QKV projection's output [num_tokens, (heads + 2 x
    kv_heads) x dim]."""
    query_lens = torch.from_numpy(meta.query_lens_host).to(meta.positions.device)
    seq = torch.repeat_interleave(torch.arange(len(query_lens), device=query_lens.device), query_lens)  # [num_tokens]
    slots = (meta.block_tables[seq, meta.positions // BLOCK_SIZE].long() * BLOCK_SIZE
             + meta.positions % BLOCK_SIZE)  # [num_tokens]
    k = k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots]  # [num_tokens, kv_heads, dim]
    qkv = torch.empty(len(slots), (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=k.dtype, device=k.device)
    v = qkv[:, (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM:].view(len(slots), NUM_KV_HEADS, HEAD_DIM)
    v.copy_(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots])
    return k, v


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
    and its work (decode: bytes of K and V; prefill: FLOPs)."""

    runs: dict
    baseline: torch.Tensor
    work: int


def decode_runs(batch: int, context: int, opts: argparse.Namespace) -> Case:
    q, k_cache, v_cache, meta, (q4, k, v), scales = make_batch(batch, context, 1)
    tiles, splits = default_decode_shape(batch, context, KV_CACHE_DTYPE == "fp8")

    def call(tiles: DecodeTiles | None = None, num_splits: int | None = None):
        return lambda: paged_decode_attention(q, k_cache, v_cache, meta, SCALE, None, tiles, num_splits, **scales)

    runs = {f"decode {decode_name(tiles, splits)}": call(),
            f"unified {_unified_name(unified_tiles(HEAD_DIM, GROUP, 1, q.dtype))}": lambda: unified_attention(
                q, k_cache, v_cache, meta, SCALE, **scales),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, enable_gqa=True)}
    flex = flex_fn(q4, k, v, is_causal=False) if not opts.skip_flex else None
    if flex is not None:
        runs["flex (compiled)"] = flex
    if opts.sweep:
        split_counts = sorted({max(1, splits // 2), splits, 2 * splits, 4 * splits})
        for sweep_tiles, count in itertools.product(DECODE_SWEEP, split_counts):
            runs[f"sweep decode {decode_name(sweep_tiles, count)}"] = call(sweep_tiles, count)
    baseline = runs["sdpa"]().transpose(1, 2).reshape(q.shape).float()
    return Case(runs, baseline, decode_bytes(batch, context, k_cache))


def decode_bytes(batch: int, context: int, k_cache: torch.Tensor) -> int:
    """The bytes of K and V a decode step of ``batch`` sequences at ``context`` keys reads."""
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()


def default_decode_shape(batch: int, context: int, kv_fp8: bool = False) -> tuple[DecodeTiles, int]:
    """The tiles and split count the decode kernel picks for a batch at full context (bf16 q)."""
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    return (decode_tiles(torch.bfloat16, batch * NUM_KV_HEADS, num_sms, kv_fp8, NUM_KV_HEADS),
            choose_num_splits(batch, NUM_KV_HEADS, context, num_sms))


def prefill_runs(batch: int, length: int, opts: argparse.Namespace) -> Case:
    q, k_cache, v_cache, meta, (q4, k, v), scales = make_batch(batch, length, length)
    tiles = prefill_tiles(HEAD_DIM, GROUP, q.dtype)
    is_prefill_kernel = uses_prefill_kernel(meta.query_lens_host, q.dtype, k_cache.dtype, HEAD_DIM, GROUP, None, tiles)
    new_kv = step_kv(k_cache, v_cache, meta) if not scales else None  # a float8 cache never takes the prefill kernel
    engine_tiles = default_tiles(HEAD_DIM, GROUP, q.dtype, new_kv, q.device)  # how the engine reads the step's keys
    runs = {f"prefill {prefill_name(engine_tiles)}" if is_prefill_kernel else "engine (unified)": lambda: (
                paged_attention_triton(q, k_cache, v_cache, meta, SCALE, **scales, new_kv=new_kv)),
            f"unified {_unified_name(unified_tiles(HEAD_DIM, GROUP, length, q.dtype))}": lambda: unified_attention(
                q, k_cache, v_cache, meta, SCALE, **scales),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=SCALE, is_causal=True, enable_gqa=True)}
    if not is_prefill_kernel and not scales:  # below the engine's threshold: the prefill kernel beside it
        runs[f"prefill {prefill_name(tiles)} (direct)"] = lambda: prefill_attention(
            q, k_cache, v_cache, meta, SCALE, tiles, new_kv=new_kv)
    for switches in ({} if scales else CONTIGUOUS_SWITCHES):  # the step's keys read apart, if not the default
        switched = dataclasses.replace(tiles, **switches)
        if switched != (engine_tiles if is_prefill_kernel else tiles):
            runs[f"prefill {prefill_name(switched)} (direct)"] = lambda t=switched: prefill_attention(
                q, k_cache, v_cache, meta, SCALE, t, new_kv=new_kv)
    flex = flex_fn(q4, k, v, is_causal=True) if not opts.skip_flex else None
    if flex is not None:
        runs["flex (compiled)"] = flex
    if opts.sweep:
        for tiles in PREFILL_SWEEP:
            runs[f"sweep unified {_unified_name(tiles)}"] = (
                lambda t=tiles: unified_attention(q, k_cache, v_cache, meta, SCALE, None, tiles=t, **scales))
    baseline = runs["sdpa"]().transpose(1, 2).reshape(q.shape).float()
    return Case(runs, baseline, batch * 4 * NUM_HEADS * HEAD_DIM * length * (length + 1) // 2)  # FLOPs


def decode_name(tiles: DecodeTiles, splits: int) -> str:
    """'n64/4w/2s x9+prefetch2+heads': keys a tile, warps, stages, splits and the switches that are on."""
    return f"n{tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s x{splits}{_switches_name(dataclasses.asdict(tiles))}"


def _switches_name(fields: dict) -> str:
    """'+prefetch2+heads+kvheads2' for the switches that are on among DecodeTiles ``fields``; '' if none."""
    return "".join(f"+{short}{'' if fields[name] is True else fields[name]}"
                   for name, short in SWITCHES.items() if fields[name] != getattr(SWITCHES_OFF, name))


def _unified_name(tiles: UnifiedTiles) -> str:
    return f"m{tiles.block_m}/n{tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s"


def prefill_name(tiles: PrefillTiles) -> str:
    """'m128/n64/8w/3s+pack+prefetch': the tiles and the switches that are on (pack_gqa,
    k_transposed, prefetch_table, contiguous_kv, tma_kv)."""
    fields = dataclasses.asdict(tiles)
    switches = "".join(f"+{short}" for flag, short in (
        ("pack_gqa", "pack"), ("k_transposed", "ktrans"), ("prefetch_table", "prefetch"), ("contiguous_kv", "contig"),
        ("tma_kv", "tma")) if fields[flag])
    return f"m{tiles.block_m}/n{tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s{switches}"


def bench_shape(kind: str, batch: int, length: int, peak: float, opts: argparse.Namespace) -> list[dict]:
    """Time every run of one shape; ``peak`` is the copy rate (TB/s, decode) or matmul rate (TFLOP/s)."""
    case = (decode_runs if kind == "decode" else prefill_runs)(batch, length, opts)
    shape = dict(kind=kind, shape=f"{batch}x{length}", work=case.work, peak=peak, baseline=case.baseline)
    rows = []
    for name, fn in case.runs.items():
        rows += time_run(shape, name, fn, opts.graph and name != "flex (compiled)")
        if opts.graph and name.startswith("decode "):  # the launch overhead a graph hides
            rows += time_run(shape, f"{name} (no graph)", fn, False)
    return rows


def time_run(shape: dict, name: str, fn, graph: bool) -> list[dict]:
    """[one row] for the run ``fn`` of ``shape``, or [] when it fails or the time budget is spent."""
    kind, batch_x_length, work, peak = shape["kind"], shape["shape"], shape["work"], shape["peak"]
    is_swept = name.startswith("sweep")
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
    return [row]


def print_table(card: str, copy_rate: float, matmul_rate: float, rows: list[dict]) -> None:
    print(f"\n{card}: copy {copy_rate:.2f} TB/s, bf16 matmul {matmul_rate:.0f} TFLOP/s; bf16 q, "
          f"{'fp8 e4m3' if KV_CACHE_DTYPE == 'fp8' else 'bf16'} KV, 32 heads / 8 KV heads, head_dim 128, block 16"
          + ("; timed as CUDA-graph replays unless '(no graph)'" if any(r["timing"] == "graph" for r in rows) else ""))
    print(f"{'kind':<8} {'shape':<10} {'kernel':<36} {'us':>10} {'GB|TFLOP':>9} {'rate':>8} {'unit':<7} {'of peak':>8}")
    for row in rows:
        if not row["kernel"].startswith("sweep"):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", default=DECODE_SHAPES, help="batch x context, comma separated ('' for none)")
    parser.add_argument("--prefill", default=PREFILL_SHAPES, help="batch x prompt length, comma separated ('' for none)")
    parser.add_argument("--sweep", action="store_true", help="also time other tiles and split counts")
    parser.add_argument("--skip-flex", action="store_true", help="no flex attention (it compiles once per shape)")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: bf16 keys and values; fp8: float8 e4m3 with per-head scales")
    parser.add_argument("--graph", action="store_true", help="time every run as replays of a CUDA graph")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="stop timing sweep runs after this many seconds (the tables still print)")
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
    rows = []
    for kind, shapes, peak in (("decode", args.decode, copy_rate), ("prefill", args.prefill, matmul_rate)):
        for shape in filter(None, shapes.split(",")):
            rows += bench_shape(kind, *batch_x_length(shape), peak, args)
            torch.cuda.empty_cache()  # the shape's tensors are gone: give their memory back
    if args.out:
        args.out.write_text(json.dumps(dict(card=card, copy_tb_s=copy_rate, matmul_tflop_s=matmul_rate,
                                            kv_cache_dtype=args.kv_cache_dtype, rows=rows), indent=1))
    print_table(card, copy_rate, matmul_rate, rows)


def batch_x_length(shape: str) -> tuple[int, int]:
    batch, length = (int(x) for x in shape.split("x"))
    return batch, length


if __name__ == "__main__":
    main()
