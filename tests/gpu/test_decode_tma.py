"""The decode kernel that reads the paged cache by tensor-descriptor loads (``DecodeTiles.tma_kv``,
kernels/decode_tma.py) against the plain-torch reference; the batches it cannot take fall back to
the pointer kernel.

Runs on a CUDA GPU; the small cases also under Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``, see tests/gpu/kernel_device.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels import decode_attention  # noqa: E402
from meshlm.kernels.attention import paged_attention_reference  # noqa: E402
from meshlm.kernels.decode_attention import DecodeTiles, paged_decode_attention  # noqa: E402
from meshlm.kernels.decode_tma import tma_decode_fits  # noqa: E402

from tests.gpu.kernel_device import KERNEL_MARKS, needs_cuda  # noqa: E402
from tests.gpu.test_decode_attention import TOLERANCES, assert_close, errors, make_decode  # noqa: E402

pytestmark = KERNEL_MARKS

# Lengths that end inside a cache block, on one, on a two-block tile, and one-token sequences.
LENGTHS = [1, 15, 16, 33, 64, 100, 145]


@pytest.fixture
def tma_launches(monkeypatch):
    """How many times the descriptor kernel was launched during the test."""
    calls = []
    launch = decode_attention.launch_tma_decode

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)
    monkeypatch.setattr(decode_attention, "launch_tma_decode", counted)
    return calls


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_n", [16, 32])
@pytest.mark.parametrize("kv_heads,group,head_dim", [(1, 4, 64), (2, 4, 64), (2, 1, 64), (2, 8, 64), (1, 4, 128),
                                                     (2, 4, 128)])
def test_descriptor_kernel_matches_reference(kv_heads, group, head_dim, block_n, num_splits, tma_launches):
    """Wide query rows of one or two KV heads, GQA groups of 1 (padded to 16 rows), 4 and 8 (two
    heads fill the 16 rows), one- and two-block tiles, whole and split."""
    tiles = DecodeTiles(block_n=block_n, num_warps=4, num_stages=2, kv_heads_per_program=kv_heads, tma_kv=True)
    max_err, mean_err = errors(LENGTHS, 4, group, head_dim, torch.bfloat16, num_splits, tiles=tiles, seed=5)
    assert_close((kv_heads, group, head_dim, block_n, num_splits), max_err, mean_err, torch.bfloat16)
    assert len(tma_launches) == 1


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("block_n", [16, 32])
def test_block_ids_two_tiles_ahead(block_n, num_splits, tma_launches):
    """``prefetch_table=2``: each tile loads the block ids of the tile two further; the lengths
    end inside the first, second and later tiles of a split, so the ids carried past the last
    tile are masked ones."""
    tiles = DecodeTiles(block_n=block_n, num_warps=4, num_stages=3, kv_heads_per_program=2, prefetch_table=2,
                        tma_kv=True)
    max_err, mean_err = errors(LENGTHS, 4, 4, 64, torch.bfloat16, num_splits, tiles=tiles, seed=8)
    assert_close((block_n, num_splits), max_err, mean_err, torch.bfloat16)
    assert len(tma_launches) == 1


def test_heads_first_and_more_splits_than_keys(tma_launches):
    """The grid ordered KV head first; splits that fall past short sequences write empty partials."""
    tiles = DecodeTiles(block_n=32, num_warps=4, num_stages=3, kv_heads_per_program=2, heads_first=True,
                        tma_kv=True)
    max_err, mean_err = errors([1, 2, 40, 300], 4, 4, 64, torch.bfloat16, 9, tiles=tiles, seed=2)
    assert_close(("heads_first",), max_err, mean_err, torch.bfloat16)
    assert len(tma_launches) == 1


@pytest.mark.parametrize("case", ["fp32", "window", "three_blocks", "wide_box"])
def test_batches_it_cannot_take_run_the_pointer_kernel(case, tma_launches):
    """fp32, a sliding window, tiles of four cache blocks, and boxes wider than 256 elements (4 KV
    heads of 128) run the pointer kernel, and still match the reference."""
    tiles = DecodeTiles(block_n=32, num_warps=4, num_stages=2, kv_heads_per_program=2, tma_kv=True)
    head_dim, dtype, window = 64, torch.bfloat16, None
    if case == "fp32":
        dtype = torch.float32
    elif case == "window":
        window = 24
    elif case == "three_blocks":
        tiles = dataclasses.replace(tiles, block_n=64)
    else:
        tiles = dataclasses.replace(tiles, kv_heads_per_program=4, block_n=16)
        head_dim = 128
    max_err, mean_err = errors(LENGTHS, 4, 4, head_dim, dtype, 3, window, tiles, seed=1)
    assert_close((case,), max_err, mean_err, dtype)
    assert tma_launches == []


def test_fits_refuses_caches_whose_blocks_are_not_rows():
    """A cache whose block stride is not block_size rows (a slice along the offset) cannot be one
    descriptor; an fp8 pool or an fp32 query is not the kernel's either."""
    q, k_cache, v_cache, _ = make_decode([40], 2, 4, 64, torch.bfloat16)
    assert tma_decode_fits(q, k_cache, v_cache, 2, 32, None)
    assert not tma_decode_fits(q, k_cache[:, :8], v_cache[:, :8], 2, 16, None)
    assert not tma_decode_fits(q, k_cache, v_cache, 2, 32, 100)
    assert not tma_decode_fits(q.float(), k_cache.float(), v_cache.float(), 2, 32, None)
    assert not tma_decode_fits(q, k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn), 2, 32, None)


@needs_cuda
@pytest.mark.parametrize("kv_heads,block_n,prefetch", [(1, 16, 1), (2, 16, 1), (2, 32, 1), (2, 16, 2), (2, 32, 2)])
def test_long_context_at_the_8b_heads(kv_heads, block_n, prefetch, tma_launches):
    """Compiled for the GPU at Llama-3-8B's heads (8 KV heads of 128, groups of 4), split and not."""
    for num_splits in (1, 9, 64):
        tiles = DecodeTiles(block_n=block_n, num_warps=4, num_stages=3, kv_heads_per_program=kv_heads,
                            prefetch_table=prefetch, tma_kv=True)
        max_err, mean_err = errors([5000, 17, 1], 8, 4, 128, torch.bfloat16, num_splits, tiles=tiles, seed=4)
        assert_close((kv_heads, block_n, num_splits), max_err, mean_err, torch.bfloat16)
    assert len(tma_launches) == 3


@needs_cuda
def test_cuda_graph_replay_follows_new_lengths(tma_launches):
    """Captured once (the descriptors are kernel parameters, fixed in the graph), replayed with
    other lengths and other cached values in the same buffers."""
    sizes = dict(num_blocks=400, max_blocks=256)
    q, k_cache, v_cache, meta = make_decode([300, 17, 1, 2000], 8, 4, 128, torch.bfloat16, **sizes)
    q2, k2, v2, meta2 = make_decode([4000, 1, 640, 33], 8, 4, 128, torch.bfloat16, seed=6, **sizes)
    tiles = DecodeTiles(block_n=32, num_warps=4, num_stages=3, kv_heads_per_program=2, tma_kv=True)
    scale = 128 ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        paged_decode_attention(q, k_cache, v_cache, meta, scale, tiles=tiles, num_splits=16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_cache, v_cache, meta, scale, tiles=tiles, num_splits=16)
    for q_now, k_now, v_now, meta_now in ((q, k_cache, v_cache, meta), (q2, k2, v2, meta2)):
        q.copy_(q_now)
        k_cache.copy_(k_now)
        v_cache.copy_(v_now)
        meta.seq_lens.copy_(meta_now.seq_lens)
        meta.block_tables.copy_(meta_now.block_tables)
        graph.replay()
        torch.cuda.synchronize()
        expected = paged_attention_reference(q_now, k_now, v_now, meta_now, scale).float()
        assert (out.float() - expected).abs().max().item() < TOLERANCES[torch.bfloat16][0]
    assert len(tma_launches) == 2
