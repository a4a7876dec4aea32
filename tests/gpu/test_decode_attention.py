"""The split-KV decode attention kernel against the plain-torch reference, and under CUDA graphs.

Runs on a CUDA GPU. The small cases also run on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_decode_attention.py

The interpreter rounds fp32 to bf16 by truncation where the GPU rounds to nearest, so its bf16
tolerance is one bf16 step wider.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from meshlm.kernels.decode_attention import (  # noqa: E402
    DecodeTiles, choose_num_splits, decode_tiles, paged_decode_attention)
from meshlm.kernels.triton_attention import paged_attention_triton  # noqa: E402

from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS, needs_cuda, random_block_tables  # noqa: E402

pytestmark = KERNEL_MARKS

BLOCK_SIZE = 16
# (max abs error, mean abs error) against the reference's output in q's dtype
TOLERANCES = {torch.float32: (2e-5 if DEVICE == "cpu" else 1e-4, 2e-6 if DEVICE == "cpu" else 1e-5),
              torch.bfloat16: (4e-2 if IS_INTERPRETED else 3e-2, 4e-3)}


def make_decode(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
                seed: int = 0, num_blocks: int | None = None, max_blocks: int | None = None):
    """Random q and KV cache with shuffled block tables and metadata for one decode per sequence.

    ``None`` sizes are the smallest that fit, plus spare blocks and a spare table column that
    point at valid blocks whose keys no query may see.
    """
    gen = torch.Generator().manual_seed(seed)
    lens = np.array(seq_lens, dtype=np.int64)
    blocks_per_seq = -(-lens // BLOCK_SIZE)
    max_blocks = int(blocks_per_seq.max()) + 1 if max_blocks is None else max_blocks
    num_blocks = int(blocks_per_seq.sum()) + 3 if num_blocks is None else num_blocks
    assert num_blocks >= blocks_per_seq.sum() and max_blocks >= blocks_per_seq.max()
    tables = random_block_tables(blocks_per_seq, num_blocks, max_blocks, gen)
    values = torch.Generator(DEVICE).manual_seed(seed)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=values, device=DEVICE)
    k_cache = torch.randn(shape, generator=values, device=DEVICE)
    v_cache = torch.randn(shape, generator=values, device=DEVICE)
    positions = lens - 1
    slots = tables[np.arange(len(lens)), positions // BLOCK_SIZE].numpy() * BLOCK_SIZE + positions % BLOCK_SIZE
    meta = AttentionMetadata(
        positions=torch.from_numpy(positions).to(DEVICE),
        slot_mapping=torch.from_numpy(slots).to(DEVICE),
        query_start_loc=torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.from_numpy(lens).int().to(DEVICE),
        block_tables=tables.int().to(DEVICE),
        max_query_len=1,
        max_seq_len=int(lens.max()),
        query_lens_host=np.ones(len(lens), dtype=np.int64),
    )
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta


def errors(seq_lens, num_kv_heads, group, head_dim, dtype, num_splits, window=None, tiles=None, seed=0):
    """(max abs error, mean abs error) of the decode kernel against the reference on one case."""
    q, k_cache, v_cache, meta = make_decode(seq_lens, num_kv_heads, group, head_dim, dtype, seed)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale, window).float()
    got = paged_decode_attention(q, k_cache, v_cache, meta, scale, window, tiles, num_splits)
    assert got.shape == q.shape and got.dtype == q.dtype
    diff = (got.float() - expected).abs()
    return diff.max().item(), diff.mean().item()


def assert_close(case, max_err, mean_err, dtype):
    max_tol, mean_tol = TOLERANCES[dtype]
    assert max_err < max_tol and mean_err < mean_tol, (*case, max_err, mean_err)


# Lengths crossing the block (16) and the fp32 tile (32) boundaries, and one-token sequences.
LENGTHS = [1, 15, 17, 32, 33, 100]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(num_splits, group, head_dim, dtype):
    max_err, mean_err = errors(LENGTHS, 1, group, head_dim, dtype, num_splits, tiles=_small_tiles(dtype))
    assert_close((num_splits, group, head_dim), max_err, mean_err, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("seq_lens,num_splits", [
    ([1, 2], 5),  # every split but the first of each sequence is empty
    ([16 * 9, 31], 4),  # splits that end on a block boundary, one sequence shorter than a split
    ([200], 7),  # splits of whole tiles, the last one short
    ([1, 64, 65, 129, 7, 48, 90, 33], 2),  # a batch of eight
    ([2100, 40], 70),  # more splits than the merge loads in one tile: two chunks, the second partial
], ids=["empty_splits", "block_edges", "one_long", "batch8", "merge_chunks"])
@pytest.mark.parametrize("fused_merge", [False, True], ids=["merge_kernel", "fused_merge"])
def test_split_boundaries(fused_merge, seq_lens, num_splits, dtype):
    tiles = DecodeTiles(block_n=32, num_warps=4, num_stages=2, fused_merge=fused_merge)
    max_err, mean_err = errors(seq_lens, 2, 4, 64, dtype, num_splits, tiles=tiles, seed=3)
    assert_close((seq_lens, num_splits), max_err, mean_err, dtype)


# (lengths, splits, window): more active splits than the fused merge loads at once (32 at 4 rows of
# 64), uneven splits (whole tiles: the last one short), sequences whose later splits hold no key,
# keys that fit one split, a window.
FUSED_CASES = {"many_splits": ([1100], 40, None), "uneven": ([200, 95], 3, None),
               "empty_splits": ([1, 2, 33], 9, None), "one_split": ([20, 31], 4, None),
               "window": ([300, 17], 6, 40)}
FUSED_TILES = {"one_head": dict(), "two_heads_splits_first": dict(kv_heads_per_program=2, splits_first=True),
               "min_split_tiles3": dict(min_split_tiles=3)}


@pytest.mark.parametrize("switches", FUSED_TILES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_merge_equals_the_merge_kernel(case, switches):
    """The merge inside the split kernel against the merge kernel (fp32: equal to rounding) and the
    reference; launched twice, so that the first launch must leave every counter at zero."""
    seq_lens, num_splits, window = FUSED_CASES[case]
    q, k_cache, v_cache, meta = make_decode(seq_lens, 2, 4, 64, torch.float32, seed=7)
    expected = paged_attention_reference(q, k_cache, v_cache, meta, 0.125, window)
    tiles = DecodeTiles(block_n=32, num_warps=4, num_stages=2, **FUSED_TILES[switches])
    two_kernels = paged_decode_attention(q, k_cache, v_cache, meta, 0.125, window, tiles, num_splits)
    fused = dataclasses.replace(tiles, fused_merge=True)
    for launch in range(2):
        got = paged_decode_attention(q, k_cache, v_cache, meta, 0.125, window, fused, num_splits)
        assert (got - two_kernels).abs().max().item() < 1e-6, (case, switches, launch)
        assert_close((case, switches, launch), (got - expected).abs().max().item(),
                     (got - expected).abs().mean().item(), torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 24, 40])
def test_sliding_window(window, num_splits):
    lengths = [1, 20, 41, 100]
    max_err, mean_err = errors(lengths, 2, 2, 64, torch.float32, num_splits, window, _small_tiles(torch.float32))
    assert_close((window, num_splits), max_err, mean_err, torch.float32)


# Every switch of the kernel alone, and all of them together, on 32-key tiles (two cache blocks):
# sequences of up to five tiles, so that prefetches cross from the unmasked tiles into the masked.
VARIANTS = {"prefetch_table1": dict(prefetch_table=1), "prefetch_table2": dict(prefetch_table=2),
            "k_transposed": dict(k_transposed=True), "paged_tile": dict(paged_tile=True),
            "heads_first": dict(heads_first=True), "kv_heads2": dict(kv_heads_per_program=2),
            "splits_first": dict(splits_first=True), "fused_merge": dict(fused_merge=True),
            "max_registers": dict(max_registers=128), "min_split_tiles2": dict(min_split_tiles=2),
            "all": dict(prefetch_table=2, k_transposed=True, paged_tile=True, heads_first=True,
                        kv_heads_per_program=2, splits_first=True, fused_merge=True),
            "swap_ab": dict(swap_ab=True),
            "swap_all": dict(swap_ab=True, min_group_rows=8, prefetch_table=2, paged_tile=True, heads_first=True,
                             kv_heads_per_program=2, fused_merge=True),
            "sum_at_end": dict(sum_at_end=True),
            "sum_at_end_kv_heads2_prefetch2": dict(sum_at_end=True, kv_heads_per_program=2, prefetch_table=2),
            "sum_at_end_swap_rows8": dict(sum_at_end=True, swap_ab=True, min_group_rows=8, prefetch_table=2),
            "sum_at_end_swap_kv_heads2_paged_fused": dict(sum_at_end=True, swap_ab=True, kv_heads_per_program=2,
                                                          paged_tile=True, fused_merge=True)}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_splits,window", [(1, None), (4, None), (3, 24)], ids=["whole", "split", "split_window"])
def test_variants_match_reference(num_splits, window, variant, dtype):
    """Lengths that end inside a block, on a block and on a tile, splits that end past the
    sequence, windows that start inside a block and inside a tile."""
    tiles = DecodeTiles(block_n=32, num_warps=4, num_stages=2, **VARIANTS[variant])
    max_err, mean_err = errors([1, 15, 16, 33, 64, 100, 145], 2, 4, 64, dtype, num_splits, window, tiles, seed=5)
    assert_close((variant, num_splits, window), max_err, mean_err, dtype)


def test_switches_out_of_range_are_refused():
    q, k_cache, v_cache, meta = make_decode([20], 1, 2, 64, torch.float32)  # blocks of 16 -> 32 below
    with pytest.raises(ValueError, match="prefetch_table=3 must be 0, 1 or 2"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, prefetch_table=3))
    with pytest.raises(ValueError, match="kv_heads_per_program=2 must be a power of two that divides the 1 KV"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, kv_heads_per_program=2))
    with pytest.raises(ValueError, match="min_split_tiles=0 must be at least 1"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, min_split_tiles=0))
    with pytest.raises(ValueError, match="max_registers=16 must lie in"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, max_registers=16))
    with pytest.raises(ValueError, match="swap_ab multiplies keys as loaded"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, k_transposed=True,
                                                                                    swap_ab=True))
    with pytest.raises(ValueError, match="min_group_rows=12 must be a power of two"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, min_group_rows=12))
    with pytest.raises(ValueError, match="fp8_widen='ptx'; choose one of cvt, bits, asm, asm_k, words_v, words"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, fp8_widen="ptx"))
    with pytest.raises(ValueError, match="fp8_widen='words' loads keys as words of a row, to widen: no "
                                         "k_transposed=True, no fp8_qk=False"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, k_transposed=True,
                                                                                    fp8_widen="words"))
    with pytest.raises(ValueError, match="no k_transposed=False, no fp8_qk=True"):
        paged_decode_attention(q, k_cache, v_cache, meta, 0.125, tiles=DecodeTiles(32, 4, 2, fp8_qk=True,
                                                                                    fp8_widen="words"))
    with pytest.raises(ValueError, match="multiple of the cache's block size 32"):
        paged_decode_attention(q, k_cache.repeat_interleave(2, 1), v_cache.repeat_interleave(2, 1), meta, 0.125,
                               tiles=DecodeTiles(16, 4, 2, paged_tile=True))


def test_the_entry_point_routes_decodes_to_the_decode_kernel():
    q, k_cache, v_cache, meta = make_decode([5, 40, 70], 2, 4, 64, torch.float32, seed=2)
    meta.max_seq_len = 4096  # as the decode graphs set it: splits as for a long context
    scale = 0.125
    num_splits = choose_num_splits(3, 2, meta.max_seq_len, 8 if DEVICE == "cpu" else
                                   torch.cuda.get_device_properties(DEVICE).multi_processor_count)
    assert num_splits > 1
    direct = paged_decode_attention(q, k_cache, v_cache, meta, scale, num_splits=num_splits)
    assert torch.equal(paged_attention_triton(q, k_cache, v_cache, meta, scale), direct)
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale)
    assert_close(("entry",), (direct - expected).abs().max().item(), (direct - expected).abs().mean().item(),
                 torch.float32)


def test_split_count_follows_batch_shape_and_caps():
    assert choose_num_splits(1, 8, 32768, 132) == 64  # 4 programs per SM would take 66
    assert choose_num_splits(8, 8, 8192, 132) == 9  # ceil(528 / 64)
    assert choose_num_splits(64, 8, 2048, 132) == 2  # 512 programs: 2 splits reach 4 per SM
    assert choose_num_splits(256, 8, 1024, 132) == 1  # 2048 programs fill the GPU already
    assert choose_num_splits(1024, 8, 256, 132) == 1
    assert choose_num_splits(1, 8, 1000, 132) == 3  # at least 256 keys a split
    assert choose_num_splits(1, 1, 10**6, 132) == 64  # at most 64
    assert choose_num_splits(1, 8, 10, 132) == 1


def test_default_tiles_are_multiples_of_the_block():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for num_programs in (1, 512, 2048):
            assert decode_tiles(dtype, num_programs, 132).block_n % BLOCK_SIZE == 0


def test_default_tiles_shrink_when_programs_are_many():
    assert decode_tiles(torch.bfloat16, 8 * 64, 132).block_n == 128  # 64 sequences x 8 KV heads
    assert decode_tiles(torch.bfloat16, 8 * 256, 132).block_n == 64


def test_small_batches_take_two_kv_heads_only_where_they_divide():
    for kv_fp8 in (False, True):
        assert decode_tiles(torch.bfloat16, 8, 132, kv_fp8, num_kv_heads=8).kv_heads_per_program == 2
        assert decode_tiles(torch.bfloat16, 3, 132, kv_fp8, num_kv_heads=3).kv_heads_per_program == 1
        for num_kv_heads in (1, 2, 3, 8):  # every default the kernel can run
            for num_programs in (num_kv_heads, 4096 * num_kv_heads):
                decode_tiles(torch.bfloat16, num_programs, 132, kv_fp8, num_kv_heads).check(16, num_kv_heads)


def test_one_sequence_reads_small_tiles_and_the_defaults_merge_in_a_second_kernel():
    one = decode_tiles(torch.bfloat16, 8, 132, num_kv_heads=8)  # 1 x 32k
    assert (one.block_n, one.num_stages, one.prefetch_table, one.kv_heads_per_program) == (32, 3, 2, 2)
    assert decode_tiles(torch.bfloat16, 8 * 8, 132, num_kv_heads=8).block_n == 128  # 8 x 8k
    many_fp8 = decode_tiles(torch.bfloat16, 8192, 132, True, 8)
    # over an fp8 pool, many programs: two KV heads a program, capped registers (more programs an SM)
    assert (many_fp8.kv_heads_per_program, many_fp8.max_registers, many_fp8.swap_ab) == (2, 128, False)
    for dtype in (torch.float32, torch.bfloat16):  # the fused merge measured slower at 1 x 32k on an H200
        for kv_fp8 in (False, True):
            for num_programs in (8, 512, 8192):
                assert not decode_tiles(dtype, num_programs, 132, kv_fp8, 8).fused_merge


def _small_tiles(dtype):
    """32-key tiles, so that tiny contexts cross tile and split boundaries."""
    return DecodeTiles(block_n=32, num_warps=4, num_stages=2)


# Batch x context of the benchmark, sequences up to 100 keys shorter so that the
# lengths cross block and tile boundaries: Llama-3-8B's heads (32 query, 8 KV, head_dim 128).
LARGE = {"1x32k": (1, 32768), "8x8k": (8, 8192), "64x2k": (64, 2048), "256x1k": (256, 1024),
         "1024x256": (1024, 256)}
LARGE_CASES = [(name, dtype) for name in LARGE for dtype in DTYPES]


@needs_cuda
@pytest.mark.parametrize("name,dtype", LARGE_CASES, ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in LARGE_CASES])
def test_large_shapes_match_reference(name, dtype):
    batch, context = LARGE[name]
    lengths = [context - (37 * i) % 101 for i in range(batch)]
    max_err, mean_err = errors(lengths, 8, 4, 128, dtype, num_splits=None, seed=1)
    assert_close((name,), max_err, mean_err, dtype)


@needs_cuda
@pytest.mark.parametrize("num_splits", [2, 9])
def test_forced_splits_on_a_long_context(num_splits):
    max_err, mean_err = errors([5000, 17, 1], 8, 4, 128, torch.bfloat16, num_splits, seed=4)
    assert_close((num_splits,), max_err, mean_err, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_on_a_long_context(variant):
    """Each switch compiled for the GPU, at the Llama-3-8B heads, split and not."""
    tiles = DecodeTiles(block_n=64, num_warps=4, num_stages=2, **VARIANTS[variant])
    for num_splits in (1, 9):
        max_err, mean_err = errors([5000, 17, 1], 8, 4, 128, torch.bfloat16, num_splits, tiles=tiles, seed=4)
        assert_close((variant, num_splits), max_err, mean_err, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("merge", ["default", "merge_kernel", "fused_merge"])
def test_cuda_graph_replay_follows_new_lengths(merge):
    """Capture a decode batch as the graph runner does (max_seq_len = the model's length), then
    replay with other lengths (longer, shorter, one token) in the same buffers: through the entry
    point with the default tiles, and with the splits merged by a second kernel or inside the split
    kernel (whose counters must be back at zero after each replay)."""
    first = [300, 17, 1, 2000]
    second = [4000, 1, 640, 33]
    scale = 128 ** -0.5
    sizes = dict(num_blocks=400, max_blocks=256)
    q, k_cache, v_cache, meta = make_decode(first, 8, 4, 128, torch.bfloat16, **sizes)
    q2, k2, v2, meta2 = make_decode(second, 8, 4, 128, torch.bfloat16, seed=6, **sizes)
    meta.max_seq_len = 4096
    assert choose_num_splits(4, 8, 4096, torch.cuda.get_device_properties(DEVICE).multi_processor_count) > 1

    tiles = dataclasses.replace(decode_tiles(torch.bfloat16, 4 * 8, 132), fused_merge=merge == "fused_merge")

    def attend():
        if merge == "default":
            return paged_attention_triton(q, k_cache, v_cache, meta, scale)
        return paged_decode_attention(q, k_cache, v_cache, meta, scale, tiles=tiles)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        attend()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attend()
    graph.replay()
    torch.cuda.synchronize()
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale).float()
    assert (out.float() - expected).abs().max().item() < 3e-2

    q.copy_(q2)
    k_cache.copy_(k2)
    v_cache.copy_(v2)
    for name in ("positions", "slot_mapping", "seq_lens", "block_tables"):
        getattr(meta, name).copy_(getattr(meta2, name))  # meta keeps its host sizes (max_seq_len 4096)
    graph.replay()
    torch.cuda.synchronize()
    expected2 = paged_attention_reference(q, k_cache, v_cache, meta, scale).float()
    assert (expected2 - expected).abs().max().item() > 0.5  # the second batch really differs
    assert (out.float() - expected2).abs().max().item() < 3e-2
    first_out = out.clone()
    graph.replay()  # the same inputs again: the same bits (the merge's order is fixed)
    torch.cuda.synchronize()
    assert torch.equal(out, first_out)
