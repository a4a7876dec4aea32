"""The Triton paged-attention kernel against the plain-torch reference, and under CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from meshlm.kernels.triton_attention import MIN_DECODES_APART, paged_attention_triton  # noqa: E402

from tests.gpu.kernel_device import random_block_tables  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BLOCK_SIZE = 16
# Each sequence is (tokens cached before this step, query tokens this step).
MIXED = [(5, 1), (40, 1), (16, 1), (20, 13), (0, 37), (33, 64), (1, 1)]
DECODES = [(n, 1) for n in (0, 1, 15, 16, 17, 63, 100, 129)]
LARGE_DECODES = [(1000 + 7 * i, 1) for i in range(64)]
LARGE_PREFILL = [(0, 2048)]
LARGE_MIXED = [(1000, 1)] * 16 + [(1536, 512), (0, 700)]


def make_case(seqs: list[tuple[int, int]], num_kv_heads: int, group: int, head_dim: int,
              dtype: torch.dtype, device: str, seed: int = 0, num_blocks: int | None = None,
              max_blocks: int | None = None):
    """Random q and KV cache, shuffled block tables padded with valid block ids, and metadata.

    ``None`` sizes are the smallest that fit, plus spare blocks and a spare table column that
    hold keys no query may see.
    """
    gen = torch.Generator().manual_seed(seed)
    cached = np.array([c for c, _ in seqs], dtype=np.int64)
    query_lens = np.array([n for _, n in seqs], dtype=np.int64)
    seq_lens = cached + query_lens
    blocks_per_seq = -(-seq_lens // BLOCK_SIZE)
    max_blocks = int(blocks_per_seq.max()) + 1 if max_blocks is None else max_blocks
    num_blocks = int(blocks_per_seq.sum()) + 3 if num_blocks is None else num_blocks
    assert num_blocks >= blocks_per_seq.sum() and max_blocks >= blocks_per_seq.max()
    tables = random_block_tables(blocks_per_seq, num_blocks, max_blocks, gen)

    num_tokens = int(query_lens.sum())
    values = torch.Generator(device).manual_seed(seed)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=values, device=device)
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=values, device=device)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=values, device=device)
    positions = np.concatenate([np.arange(c, c + n) for c, n in seqs])
    seq_of_token = np.repeat(np.arange(len(seqs)), query_lens)
    slots = tables[seq_of_token, positions // BLOCK_SIZE].numpy() * BLOCK_SIZE + positions % BLOCK_SIZE
    meta = AttentionMetadata(
        positions=torch.from_numpy(positions).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        query_start_loc=torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)])).int().to(device),
        seq_lens=torch.from_numpy(seq_lens).int().to(device),
        block_tables=tables.int().to(device),
        max_query_len=int(query_lens.max()),
        max_seq_len=int(seq_lens.max()),
        query_lens_host=query_lens,
    )
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), meta


def max_errors(seqs, num_kv_heads, group, head_dim, dtype, device, window=None, seed=0):
    """(max abs error, mean abs error) of the kernel against the reference on one case."""
    q, k_cache, v_cache, meta = make_case(seqs, num_kv_heads, group, head_dim, dtype, device, seed)
    scale = head_dim ** -0.5
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale, window).float()
    got = paged_attention_triton(q, k_cache, v_cache, meta, scale, window)
    assert got.shape == q.shape and got.dtype == q.dtype
    diff = (got.float() - expected).abs()
    # a second layer of the same step (same metadata object) must give the same answer
    again = paged_attention_triton(q, k_cache, v_cache, meta, scale, window)
    assert torch.equal(again, got)
    return diff.max().item(), diff.mean().item()


CASES = [("mixed", MIXED), ("decodes", DECODES), ("fresh_prompt", [(0, 50)])]
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 3e-3), torch.float16: (4e-3, 4e-4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window24"])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("name,seqs", CASES, ids=[c[0] for c in CASES])
def test_small_cases_match_reference(name, seqs, group, window, dtype):
    max_err, mean_err = max_errors(seqs, 2, group, 64, dtype, "cuda", window)
    max_tol, mean_tol = TOLERANCES[dtype]
    assert max_err < max_tol and mean_err < mean_tol, (name, group, window, dtype, max_err, mean_err)


LARGE = [("64_decodes_1000_ctx", LARGE_DECODES, None), ("prefill_2048", LARGE_PREFILL, None),
         ("mixed_large", LARGE_MIXED, None), ("mixed_large_window", LARGE_MIXED, 256)]
LARGE_CASES = ([(name, seqs, window, dtype) for name, seqs, window in LARGE
                for dtype in (torch.float32, torch.bfloat16)]
               + [("mixed_large", LARGE_MIXED, None, torch.float16)])


@pytest.mark.parametrize("name,seqs,window,dtype", LARGE_CASES,
                         ids=[f"{c[0]}-{str(c[3]).removeprefix('torch.')}" for c in LARGE_CASES])
def test_large_cases_match_reference(name, seqs, window, dtype):
    max_err, mean_err = max_errors(seqs, 8, 4, 128, dtype, "cuda", window, seed=1)
    max_tol, mean_tol = TOLERANCES[dtype]
    assert max_err < max_tol and mean_err < mean_tol, (name, window, dtype, max_err, mean_err)


# A step of in-flight batching: MIN_DECODES_APART decodes (contexts across block edges), then short chunks.
DECODES_THEN_CHUNKS = [(3 + 9 * i, 1) for i in range(MIN_DECODES_APART)] + [(20, 13), (0, 37)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", [None, 24], ids=["full", "window24"])
def test_decodes_ahead_of_short_chunks_run_apart(window, dtype):
    """The decodes by the decode kernel, the chunks by the unified kernel: the same attention."""
    q, k_cache, v_cache, meta = make_case(DECODES_THEN_CHUNKS, 2, 4, 64, dtype, "cuda", seed=3)
    scale = 0.125
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale, window).float()
    got = paged_attention_triton(q, k_cache, v_cache, meta, scale, window)
    assert ("decodes_then_chunks", MIN_DECODES_APART) in meta.derived  # the batch was split
    diff = (got.float() - expected).abs()
    max_tol, mean_tol = TOLERANCES[dtype]
    assert diff.max().item() < max_tol and diff.mean().item() < mean_tol, (diff.max().item(), diff.mean().item())
    # one decode fewer: the unified kernel takes the whole batch, and agrees
    fewer = DECODES_THEN_CHUNKS[1:]
    q, k_cache, v_cache, meta = make_case(fewer, 2, 4, 64, dtype, "cuda", seed=3)
    got = paged_attention_triton(q, k_cache, v_cache, meta, scale, window)
    assert not any(key[0] == "decodes_then_chunks" for key in meta.derived)
    diff = (got.float() - paged_attention_reference(q, k_cache, v_cache, meta, scale, window).float()).abs()
    assert diff.max().item() < max_tol, diff.max().item()


def _refill(dst: AttentionMetadata, src: AttentionMetadata) -> None:
    """Write src's device tensors into dst's (same shapes), as an engine does before a replay."""
    for name in ("positions", "slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        getattr(dst, name).copy_(getattr(src, name))
    dst.query_lens_host = src.query_lens_host


@pytest.mark.parametrize("first,second", [
    ([(i * 9, 1) for i in range(8)], [(300 - i * 11, 1) for i in range(8)]),
    ([(3, 1), (20, 13), (0, 30)], [(70, 1), (5, 30), (16, 13)]),
], ids=["decode", "mixed"])
def test_cuda_graph_replay_follows_updated_metadata(first, second):
    """Capture on one batch, refill the same buffers with another batch of equal shapes, replay."""
    num_kv_heads, group, head_dim, scale = 2, 3, 64, 0.125
    sizes = dict(num_blocks=160, max_blocks=24)
    q, k_cache, v_cache, meta = make_case(first, num_kv_heads, group, head_dim, torch.bfloat16, "cuda",
                                          **sizes)
    q2, k2, v2, meta2 = make_case(second, num_kv_heads, group, head_dim, torch.bfloat16, "cuda", seed=5,
                                  **sizes)
    assert k2.shape == k_cache.shape and meta2.block_tables.shape == meta.block_tables.shape

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        paged_attention_triton(q, k_cache, v_cache, meta, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    graph.replay()
    torch.cuda.synchronize()
    expected = paged_attention_reference(q, k_cache, v_cache, meta, scale).float()
    assert (out.float() - expected).abs().max().item() < 3e-2

    q.copy_(q2)
    k_cache.copy_(k2)
    v_cache.copy_(v2)
    _refill(meta, meta2)  # meta keeps the captured batch's host-known sizes (max_query_len, ...)
    graph.replay()
    torch.cuda.synchronize()
    expected2 = paged_attention_reference(q, k_cache, v_cache, meta, scale).float()
    assert (expected2 - expected).abs().max().item() > 0.5  # the second batch really differs
    assert (out.float() - expected2).abs().max().item() < 3e-2
