"""Paged decode attention on one GPU: the split-KV decode kernel, the unified kernel and PyTorch
SDPA (on the same keys and values laid out contiguously), against the card's copy bandwidth.

    python3 benchmarks/attention_bench.py [--shapes 1x32768,8x8192] [--sweep] [--out attention.json]

Llama-3-8B's attention on one GPU: 32 query heads, 8 KV heads, head_dim 128, bf16, KV block size
16, every sequence of the batch at the full context, block tables shuffled. Each timing is the
median of CUDA-event times after a warm-up. "KV GB" is the keys and values a step must read;
"of copy" is the rate of reading them against the device-to-device copy rate (read + write
bytes) measured in the same run. ``--sweep`` also times the decode kernel at other tiles.
Prints one table last.
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
from meshlm.kernels.triton_attention import unified_attention  # noqa: E402

SHAPES = "1x32768,8x8192,64x2048,256x1024,1024x256"
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
SWEEP = [DecodeTiles(block_n, warps, stages) for block_n, warps, stages in (
    (16, 2, 2), (16, 4, 3), (32, 2, 3), (32, 4, 2), (32, 4, 3), (32, 4, 4), (32, 8, 3), (64, 2, 3),
    (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3))]


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


def paged_cache(num_blocks: int, layout: str) -> torch.Tensor:
    """A [num_blocks, block_size, kv_heads, dim] cache; "head" stores it head-major in memory
    ([num_blocks, kv_heads, block_size, dim], so one head's block is contiguous) behind that view."""
    if layout == "token":
        return torch.randn((num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    stored = torch.randn((num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM), device="cuda", dtype=torch.bfloat16)
    return stored.permute(0, 2, 1, 3)


def make_batch(batch: int, context: int, layout: str = "token"):
    """q [batch, heads, dim], a paged cache with shuffled tables, decode metadata, and the same
    keys and values contiguous for SDPA ([batch, kv_heads, context, dim])."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = paged_cache(num_blocks, layout)
    v_cache = paged_cache(num_blocks, layout)
    tables = torch.randperm(num_blocks, device="cuda").view(batch, blocks_per_seq).int()
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        positions=(seq_lens - 1).long(), slot_mapping=torch.zeros(batch, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"), seq_lens=seq_lens,
        block_tables=tables, max_query_len=1, max_seq_len=context, query_lens_host=np.ones(batch, np.int64))

    def contiguous(cache):  # [batch, kv_heads, context, dim]
        return cache[tables.long()].reshape(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()

    return q, k_cache, v_cache, meta, contiguous(k_cache), contiguous(v_cache)


def bench_shape(batch: int, context: int, copy_rate: float, sweep: bool, layout: str = "token") -> list[dict]:
    q, k_cache, v_cache, meta, k, v = make_batch(batch, context, layout)
    scale = HEAD_DIM ** -0.5
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
    q4 = q.unsqueeze(2)  # [batch, heads, 1, dim]
    num_splits = choose_num_splits(batch, NUM_KV_HEADS, context, torch.cuda.get_device_properties(0).multi_processor_count)
    runs = {f"decode (splits {num_splits})": lambda: paged_decode_attention(q, k_cache, v_cache, meta, scale),
            "unified": lambda: unified_attention(q, k_cache, v_cache, meta, scale),
            "sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)}
    if layout != "token":
        runs = {f"{name} [{layout}-major]": fn for name, fn in runs.items() if not name.startswith("sdpa")}
    if sweep:
        for tiles in SWEEP:
            for splits in sorted({num_splits, 2 * num_splits, 4 * num_splits, max(1, num_splits // 2)}):
                runs[f"decode {tiles.block_n}/{tiles.num_warps}w/{tiles.num_stages}s x{splits}"] = (
                    lambda t=tiles, s=splits: paged_decode_attention(q, k_cache, v_cache, meta, scale, None, t, s))
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
    parser.add_argument("--kv-layout", choices=("token", "head", "both"), default="token",
                        help="the cache's memory order: token-major (the engine's) or head-major")
    args = parser.parse_args()
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0)
    copy_tb_s()  # the first timed work of a process runs slow (clocks, lazy set-up): not measured
    copy_rate = copy_tb_s()
    print(f"{card}: device-to-device copy {copy_rate:.2f} TB/s (read + write); default tiles "
          f"{decode_tiles(torch.bfloat16)}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        batch, context = (int(x) for x in shape.split("x"))
        for layout in ("token", "head") if args.kv_layout == "both" else (args.kv_layout,):
            rows += bench_shape(batch, context, copy_rate, args.sweep, layout)
        torch.cuda.empty_cache()  # the shape's tensors are gone: give their memory back
    if args.out:
        args.out.write_text(json.dumps(dict(card=card, copy_tb_s=copy_rate, rows=rows), indent=1))
    print(f"\n{card}, copy {copy_rate:.2f} TB/s; bf16, 32 heads / 8 KV heads, head_dim 128, block 16")
    print(f"{'batch x ctx':<12} {'kernel':<28} {'us':>9} {'KV GB':>7} {'TB/s':>6} {'of copy':>8}")
    for row in rows:
        print(f"{row['shape']:<12} {row['kernel']:<28} {row['ms'] * 1e3:9.1f} {row['kv_gb']:7.3f} "
              f"{row['tb_s']:6.2f} {row['of_copy']:8.1%}")


if __name__ == "__main__":
    main()
