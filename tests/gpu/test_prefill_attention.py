"""The unified kernel on prefill chunks (causal tiles skipped above the diagonal, masked on it,
whole below it) against the plain-torch reference, at its default and at explicit tiles.

Runs on a CUDA GPU, and on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_prefill_attention.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from meshlm.kernels.attention_tiles import UnifiedTiles, unified_tiles  # noqa: E402
from meshlm.kernels.triton_attention import unified_attention  # noqa: E402

from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS  # noqa: E402

pytestmark = KERNEL_MARKS

BLOCK_SIZE = 16
TOLERANCES = {torch.float32: (2e-5 if DEVICE == "cpu" else 1e-4, 2e-6 if DEVICE == "cpu" else 1e-5),
              torch.bfloat16: (3e-2, 3e-3)}
DTYPES = [torch.float32] if IS_INTERPRETED else [torch.float32, torch.bfloat16]


def make_prefill(seqs: list[tuple[int, int]], num_kv_heads: int, group: int, head_dim: int,
                 dtype: torch.dtype, seed: int = 0):
    """(cached tokens, query tokens) per sequence: random q and cache, shuffled block tables with a
    spare column, and metadata."""
    gen = torch.Generator().manual_seed(seed)
    cached = np.array([c for c, _ in seqs], dtype=np.int64)
    query_lens = np.array([n for _, n in seqs], dtype=np.int64)
    seq_lens = cached + query_lens
    blocks_per_seq = -(-seq_lens // BLOCK_SIZE)
    num_blocks = int(blocks_per_seq.sum()) + 2
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(seqs), int(blocks_per_seq.max()) + 1), generator=gen)
    ends = np.cumsum(blocks_per_seq)
    for row, count in enumerate(blocks_per_seq):
        tables[row, :count] = order[ends[row] - count:ends[row]]
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    q = torch.randn(int(query_lens.sum()), num_kv_heads * group, head_dim, generator=gen)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    positions = np.concatenate([np.arange(c, c + n) for c, n in seqs])
    rows = np.repeat(np.arange(len(seqs)), query_lens)
    slots = tables[rows, positions // BLOCK_SIZE].numpy() * BLOCK_SIZE + positions % BLOCK_SIZE
    meta = AttentionMetadata(
        positions=torch.from_numpy(positions).to(DEVICE), slot_mapping=torch.from_numpy(slots).to(DEVICE),
        query_start_loc=torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)])).int().to(DEVICE),
        seq_lens=torch.from_numpy(seq_lens).int().to(DEVICE), block_tables=tables.int().to(DEVICE),
        max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()), query_lens_host=query_lens)
    return (q.to(DEVICE, dtype), k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), meta)


def check(seqs, group, dtype, tiles=None, window=None, head_dim=32, num_kv_heads=2):
    q, k_cache, v_cache, meta = make_prefill(seqs, num_kv_heads, group, head_dim, dtype)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale, window).float()
    got = unified_attention(q, k_cache, v_cache, meta, scale, window, tiles=tiles)
    diff = (got.float() - expected).abs()
    max_tol, mean_tol = TOLERANCES[dtype]
    assert diff.max() < max_tol and diff.mean() < mean_tol, (seqs, group, tiles, window, diff.max(), diff.mean())


# A fresh prompt and a chunk after a cached context, neither a multiple of any tile; a mixed batch.
SHAPES = {"fresh_prompt_83": [(0, 83)], "chunk_70_after_37": [(37, 70)],
          "mixed": [(0, 45), (20, 1), (64, 33), (5, 1)]}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("name", SHAPES)
def test_default_tiles_match_reference(name, group, dtype):
    check(SHAPES[name], group, dtype)


@pytest.mark.parametrize("tiles", [UnifiedTiles(16, 16, 4, 2), UnifiedTiles(32, 64, 4, 3), UnifiedTiles(64, 32, 8, 2)],
                         ids=lambda t: f"m{t.block_m}n{t.block_n}w{t.num_warps}s{t.num_stages}")
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window24"])
def test_explicit_tiles_match_reference(tiles, window):
    check([(37, 70), (0, 29)], 4, torch.float32, tiles, window)


def test_default_tiles_of_the_8b_shape():
    """The 8B shape's prefill (head_dim 128, 4 heads a group) at the tiles chosen for bf16."""
    tiles = unified_tiles(128, 4, 200, torch.bfloat16)
    check([(0, 200)], 4, torch.float32, tiles, head_dim=128, num_kv_heads=1)
