"""Paged decode attention on one GPU: the split-KV decode kernel, the unified kernel and PyTorch
SDPA (on the same keys and values laid out contiguously), against the card's copy bandwidth.

    python3 benchmarks/attention_bench.py [--shapes 1x32768,8x8192] [--sweep] [--out attention.json]
    python3 benchmarks/attention_bench.py --kv-cache-dtype fp8      # the cache in float8 e4m3

Llama-3-8B's attention on one GPU: 32 query heads, 8 KV heads, head_dim 128, bf16, KV block size
16, every sequence of the batch at the full context, block tables shuffled. Each timing is the
median of CUDA-event times after a warm-up. "KV GB" is the keys and values a step must read;
"of copy" is the rate of reading them against the device-to-device copy rate (read + write
bytes) measured in the same run. ``--sweep`` also times the decode kernel at other tiles.
``--kv-cache-dtype fp8`` stores the cache in float8 e4m3 with per-head scales (each head's largest
value maps to 448); SDPA then reads the dequantized bf16 keys and values. Prints one table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.kernels.attention import AttentionMetadata  # noqa: E402
from meshlm.kernels.decode_attention import (  # noqa: E402
    DecodeTiles, choose_num_splits, decode_tiles, paged_decode_attention)
from meshlm.kernels.kv_quant import FP8_KV_MAX, dequantize_kv, quantize_kv  # noqa: E402
from meshlm.kernels.triton_attention import unified_attention  # noqa: E402

SHAPES = "1x32768,8x8192,64x2048,256x1024,1024x256"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SWEEP = [DecodeTiles(32, 4, 3), DecodeTiles(64, 4, 2), DecodeTiles(64, 4, 3), DecodeTiles(64, 4, 4),
         DecodeTiles(128, 4, 2), DecodeTiles(128, 8, 3)]


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


def copy_tb_s(num_bytes: int = 2**31) -> float:
    """Device-to-device copy, counting read + write bytes."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters=20)
    return 2 * num_bytes / (ms * 1e-3) / 1e12


def make_batch(batch: int, context: int, kv_cache_dtype: str):
    """q [batch, heads, dim], a paged cache with shuffled tables, decode metadata, the same keys and
    values contiguous for SDPA ([batch, kv_heads, context, dim]) and the kernels' scale arguments."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).int()
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    scales = {}
    if kv_cache_dtype == "fp8":
        scales = {name: cache.abs().amax((0, 1, 3)).float() / FP8_KV_MAX  # [kv_heads]
                  for name, cache in (("k_scale", k_cache), ("v_scale", v_cache))}
        k_cache = quantize_kv(k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM), scales["k_scale"]).view(shape)
        v_cache = quantize_kv(v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM), scales["v_scale"]).view(shape)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        positions=(seq_lens - 1).long(), slot_mapping=torch.zeros(batch, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"), seq_lens=seq_lens,
        block_tables=tables, max_query_len=1, max_seq_len=context, query_lens_host=np.ones(batch, np.int64))

    def contiguous(cache, scale_name):  # [batch, kv_heads, context, dim] bf16
        if scales:
            cache = dequantize_kv(cache, scales[scale_name]).to(torch.bfloat16)
        return cache[tables.long()].view(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()

    return q, k_cache, v_cache, meta, contiguous(k_cache, "k_scale"), contiguous(v_cache, "v_scale"), scales


def bench_shape(batch: int, context: int, copy_rate: float, sweep: bool, kv_cache_dtype: str) -> list[dict]:
    q, k_cache, v_cache, meta, k, v, scales = make_batch(batch, context, kv_cache_dtype)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    q4 = q.unsqueeze(2)  # [batch, heads, 1, dim]
    num_splits = choose_num_splits(batch, NUM_KV_HEADS, context, torch.cuda.get_device_properties(0).multi_processor_count)
    runs = {f"decode (splits {num_splits})": lambda: paged_decode_attention(q, k_cache, v_cache, meta, scale, **scales),
            "unified": lambda: unified_attention(q, k_cache, v_cache, meta, scale, **scales),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)}
    if sweep:
        for tiles in SWEEP:
            for splits in sorted({num_splits, 2 * num_splits}):
                runs[f"decode {tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s x{splits}"] = (
                    lambda t=tiles, s=splits: paged_decode_attention(q, k_cache, v_cache, meta, scale, None, t, s,
                                                                     **scales))
    baseline = F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True).squeeze(2).float()
    rows = []
    for name, fn in runs.items():
        try:
            err = (fn().view(batch, NUM_HEADS, HEAD_DIM).float() - baseline).abs().max().item()
            ms = median_ms(fn)
        except Exception as error:  # a tile that does not fit (shared memory) skips, not stops, the run
            print(f"{batch}x{context:<6} {name:<28} failed: {type(error).__name__}: {error}", flush=True)
            continue
        rate = kv_bytes / (ms * 1e-3) / 1e12
        rows.append(dict(shape=f"{batch}x{context}", kernel=name, ms=ms, kv_gb=kv_bytes / 1e9, tb_s=rate,
                         of_copy=rate / copy_rate, max_diff_vs_sdpa=err))
        print(f"{batch}x{context:<6} {name:<28} {ms * 1e3:9.1f} us  {rate:5.2f} TB/s  "
              f"{rate / copy_rate:6.1%} of copy  max |diff| vs sdpa {err:.2e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="batch x context, comma separated")
    parser.add_argument("--sweep", action="store_true", help="also time the decode kernel at other tiles")
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: bf16 keys and values; fp8: float8 e4m3 with per-head scales")
    args = parser.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0)
    copy_rate = copy_tb_s()
    print(f"{card}: device-to-device copy {copy_rate:.2f} TB/s (read + write); default tiles "
          f"{decode_tiles(torch.bfloat16)}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        rows += bench_shape(batch, context, copy_rate, args.sweep, args.kv_cache_dtype)
        torch.cuda.empty_cache()  # the shape's tensors are gone: give their memory back
    if args.out:
        args.out.write_text(json.dumps(dict(card=card, copy_tb_s=copy_rate, kv_cache_dtype=args.kv_cache_dtype,
                                            rows=rows), indent=1))
    kv = "bf16 KV" if args.kv_cache_dtype == "auto" else "fp8 e4m3 KV"
    print(f"\n{card}, copy {copy_rate:.2f} TB/s; bf16 q, {kv}, 32 heads / 8 KV heads, head_dim 128, block 16")
    print(f"{'batch x ctx':<12} {'kernel':<28} {'us':>9} {'KV GB':>7} {'TB/s':>6} {'of copy':>8}")
    for row in rows:
        print(f"{row['shape']:<12} {row['kernel']:<28} {row['ms'] * 1e3:9.1f} {row['kv_gb']:7.3f} "
              f"{row['tb_s']:6.2f} {row['of_copy']:8.1%}")


if __name__ == "__main__":
    main()
