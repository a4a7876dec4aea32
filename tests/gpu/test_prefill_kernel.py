"""The prefill kernel (kernels/prefill_attention.py) against the plain-torch reference: batches of
prefill chunks after cached context, GQA packed and not, every switch (the step's own keys and
values read apart from the pool among them, with NaN left in the cache in their place); and the
entry point's choice of kernel. On a GPU also Llama-3-8B's heads at 8k tokens in bf16 and fp32.

Runs on a CUDA GPU, and on the CPU in Triton's interpreter (small shapes, fp32):

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_prefill_kernel.py
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels import prefill_tiles, triton_attention  # noqa: E402
from meshlm.kernels.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from meshlm.kernels.prefill_attention import default_tiles, prefill_attention  # noqa: E402
from meshlm.kernels.prefill_tiles import PREFILL_MIN_QUERY_LEN, PrefillTiles  # noqa: E402

from tests.gpu.kernel_device import DEVICE, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS

BLOCK_SIZE = 16


def make_batch(seqs: list[tuple[int, int]], num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
               seed: int = 0, block_size: int = BLOCK_SIZE):
    """(cached tokens, query tokens) per sequence: random q, a cache whose slots outside every
    sequence hold NaN (a kernel must never let them reach a result), block tables drawn at random
    from a shuffled pool with a spare column, and metadata."""
    gen = torch.Generator().manual_seed(seed)
    query_lens = np.array([n for _, n in seqs], dtype=np.int64)
    seq_lens = np.array([c + n for c, n in seqs], dtype=np.int64)
    blocks_per_seq = -(-seq_lens // block_size)
    num_blocks = int(blocks_per_seq.sum()) + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seqs), int(blocks_per_seq.max()) + 1), num_blocks - 1)  # a spare block
    ends = np.cumsum(blocks_per_seq)
    for row, count in enumerate(blocks_per_seq):
        tables[row, :count] = order[ends[row] - count:ends[row]]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    for row, length in enumerate(seq_lens.tolist()):
        # [length] slots of the sequence's tokens: its blocks' slots in order
        slots = (tables[row, :blocks_per_seq[row], None] * block_size + torch.arange(block_size)).flatten()[:length]
        for cache in (k_cache, v_cache):
            cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(length, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(int(query_lens.sum()), num_kv_heads * group, head_dim, generator=gen)
    positions = np.concatenate([np.arange(c, c + n) for c, n in seqs])
    rows = np.repeat(np.arange(len(seqs)), query_lens)
    slot_mapping = tables[rows, positions // block_size].numpy() * block_size + positions % block_size
    meta = AttentionMetadata(
        positions=torch.from_numpy(positions).to(DEVICE), slot_mapping=torch.from_numpy(slot_mapping).to(DEVICE),
        query_start_loc=torch.from_numpy(np.concatenate([[0], np.cumsum(query_lens)])).int().to(DEVICE),
        seq_lens=torch.from_numpy(seq_lens).int().to(DEVICE), block_tables=tables.int().to(DEVICE),
        max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()), query_lens_host=query_lens)
    return q.to(DEVICE, dtype), k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), meta


def take_step_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, group: int) -> tuple:
    """The step's own keys and values as the attention layer passes them, taken out of the cache:
    the keys [num_tokens, num_kv_heads, head_dim] in a tensor of their own, the values a view of a
    merged QKV row whose other columns hold NaN. The cache keeps NaN at the step's slots, so a
    kernel that read the step's keys there (or outside those views) gives NaN."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = meta.slot_mapping.long()
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots]  # [num_tokens, num_kv_heads, head_dim]
    qkv = torch.full((len(slots), (group + 2) * num_kv_heads * head_dim), float("nan"), dtype=k.dtype, device=k.device)
    v = qkv[:, (group + 1) * num_kv_heads * head_dim:].view(len(slots), num_kv_heads, head_dim)
    v.copy_(v_cache.view(-1, num_kv_heads, head_dim)[slots])
    for cache in (k_cache, v_cache):
        cache.view(-1, num_kv_heads, head_dim)[slots] = float("nan")
    return k, v


def errors(seqs, group, dtype, tiles=None, head_dim=32, num_kv_heads=2, seed=0, block_size=BLOCK_SIZE):
    """(max abs error, relative error: norm of the difference / norm of the reference). Tiles with
    ``contiguous_kv`` get the step's keys and values apart, and NaN in the cache in their place."""
    q, k_cache, v_cache, meta = make_batch(seqs, num_kv_heads, group, head_dim, dtype, seed, block_size)
    scale = head_dim ** -0.5
    # the reference reads whole blocks: give it zeros where the kernel's cache holds NaN
    expected = paged_attention_reference(q, k_cache.nan_to_num(), v_cache.nan_to_num(), meta, scale).float()
    new_kv = take_step_kv(k_cache, v_cache, meta, group) if tiles is not None and tiles.contiguous_kv else None
    got = prefill_attention(q, k_cache, v_cache, meta, scale, tiles, new_kv=new_kv)
    assert got.shape == q.shape and got.dtype == q.dtype
    diff = got.float() - expected
    return diff.abs().max().item(), (diff.norm() / expected.norm()).item()


# Several sequences: a fresh prompt, chunks after context that start mid-block (37, 5) and on a
# block edge (64), decodes mixed in; lengths no multiple of any tile.
BATCH = [(0, 45), (37, 70), (20, 1), (64, 33), (5, 1)]
FP32_MAX_ERROR = 2e-5 if DEVICE == "cpu" else 1e-4


@pytest.mark.parametrize("group", [1, 3, 4])
def test_default_tiles_match_reference(group):
    max_err, _ = errors(BATCH, group, torch.float32)
    assert max_err < FP32_MAX_ERROR, (group, max_err)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_batches_match_reference(seed):
    """Random context and chunk lengths (decodes among them), GQA group and block tables."""
    rng = np.random.default_rng(seed)
    seqs = [(int(rng.integers(0, 90)), int(rng.choice([1, rng.integers(2, 60)]))) for _ in range(rng.integers(2, 6))]
    group = int(rng.choice([1, 2, 4]))
    max_err, _ = errors(seqs, group, torch.float32, seed=seed)
    assert max_err < FP32_MAX_ERROR, (seqs, group, max_err)


# (tiles, GQA group): every switch, each combined with others; a group of 3 unpacked.
SWITCHES = [(PrefillTiles(16, 16, 4, 2), 4), (PrefillTiles(32, 16, 4, 2, pack_gqa=False), 3),
            (PrefillTiles(16, 32, 4, 2, k_transposed=True), 4), (PrefillTiles(32, 16, 4, 3, prefetch_table=True), 4),
            (PrefillTiles(32, 32, 4, 2, pack_gqa=False, k_transposed=True, prefetch_table=True), 4)]


@pytest.mark.parametrize("tiles,group", SWITCHES, ids=lambda t: (
    f"m{t.block_m}n{t.block_n}s{t.num_stages}{'-pack' * t.pack_gqa}{'-ktrans' * t.k_transposed}"
    f"{'-prefetch' * t.prefetch_table}") if isinstance(t, PrefillTiles) else f"group{t}")
def test_switches_match_reference(tiles, group):
    max_err, _ = errors(BATCH, group, torch.float32, tiles)
    assert max_err < FP32_MAX_ERROR, (tiles, group, max_err)


# The step's own keys and values read apart from the pool: by pointer loads and by tensor descriptors.
CONTIGUOUS = {"pointers": dict(contiguous_kv=True), "descriptors": dict(contiguous_kv=True, tma_kv=True)}


@pytest.mark.parametrize("kind", CONTIGUOUS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_step_keys_read_apart_match_reference(kind, group):
    """A fresh prompt, chunks after a cached prefix (keys split between the pool and the step's
    tensors, the split mid-block and on a block edge) and decodes in one batch."""
    tiles = PrefillTiles(max(16, 4 * group), 16, 4, 2, prefetch_table=True, **CONTIGUOUS[kind])
    max_err, _ = errors(BATCH, group, torch.float32, tiles)
    assert max_err < FP32_MAX_ERROR, (tiles, group, max_err)


@pytest.mark.parametrize("kind", CONTIGUOUS)
@pytest.mark.parametrize("head_dim,seqs", [(64, [(21, 40), (0, 1), (0, 19)]), (128, [(37, 50)])])
def test_step_keys_read_apart_for_heads_64_and_128_wide(kind, head_dim, seqs):
    tiles = PrefillTiles(16, 32, 4, 2, **CONTIGUOUS[kind])
    max_err, _ = errors(seqs, 4, torch.float32, tiles, head_dim=head_dim, num_kv_heads=1)
    assert max_err < FP32_MAX_ERROR, (tiles, head_dim, max_err)


def test_step_keys_read_apart_with_every_other_switch():
    """Unpacked rows, keys loaded transposed (pool and step alike), a group of 3, 8-key blocks."""
    tiles = PrefillTiles(32, 16, 4, 2, pack_gqa=False, k_transposed=True, contiguous_kv=True)
    max_err, _ = errors(BATCH, 3, torch.float32, tiles, block_size=8)
    assert max_err < FP32_MAX_ERROR, max_err


def test_step_keys_read_from_the_pool_give_nan():
    """The check above can fail: the same batch, NaN in the cache at the step's slots, read
    through the pool (contiguous_kv off) is wrong."""
    q, k_cache, v_cache, meta = make_batch([(37, 30)], 1, 4, 32, torch.float32)
    new_kv = take_step_kv(k_cache, v_cache, meta, 4)
    got = prefill_attention(q, k_cache, v_cache, meta, 32 ** -0.5, PrefillTiles(16, 16, 4, 2), new_kv=new_kv)
    assert got.isnan().any()


def test_step_keys_apart_need_them():
    q, k_cache, v_cache, meta = make_batch([(0, 20)], 1, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="new_kv"):
        prefill_attention(q, k_cache, v_cache, meta, 0.125, PrefillTiles(16, 16, 4, 2, contiguous_kv=True))
    k, v = take_step_kv(k_cache, v_cache, meta, 4)
    with pytest.raises(ValueError, match=r"new_kv's k: shape \(19, 1, 32\)"):
        prefill_attention(q, k_cache, v_cache, meta, 0.125, PrefillTiles(16, 16, 4, 2, contiguous_kv=True),
                          new_kv=(k[1:], v))


def test_default_tiles_load_the_step_keys_by_descriptors_from_tma_min_tokens():
    """bf16 steps of fewer than TMA_MIN_TOKENS query tokens read their own keys by pointers, longer
    ones by descriptors; a step without them reads the pool."""
    minimum = prefill_tiles.TMA_MIN_TOKENS

    def tiles_for(num_tokens):
        step_kv = tuple(torch.zeros(num_tokens, 8, 128, dtype=torch.bfloat16) for _ in range(2))
        return default_tiles(128, 4, torch.bfloat16, step_kv)
    assert tiles_for(minimum).contiguous_kv and tiles_for(minimum).tma_kv
    assert tiles_for(minimum - 1).contiguous_kv and not tiles_for(minimum - 1).tma_kv
    pool = default_tiles(128, 4, torch.bfloat16, None)
    assert not pool.contiguous_kv and not pool.tma_kv


@pytest.mark.parametrize("block_size", [8, 32])
def test_cache_blocks_smaller_and_larger_than_a_tile(block_size):
    """16-key tiles over cache blocks of 8 keys (two blocks a tile) and of 32 (two tiles a block)."""
    max_err, _ = errors([(37, 70), (0, 29), (5, 1)], 4, torch.float32, PrefillTiles(16, 16, 4, 2, prefetch_table=True),
                        block_size=block_size)
    assert max_err < FP32_MAX_ERROR, (block_size, max_err)


def test_heads_64_wide():
    max_err, _ = errors([(21, 40), (0, 1)], 2, torch.float32, head_dim=64, num_kv_heads=1)
    assert max_err < FP32_MAX_ERROR, max_err


def test_entry_point_sends_long_prefills_to_the_prefill_kernel(monkeypatch):
    """paged_attention_triton picks the prefill kernel from PREFILL_MIN_QUERY_LEN query tokens on,
    the unified kernel below it and with a sliding window, the decode kernel for decodes; decodes
    ahead of long chunks (the scheduler's order) go to the decode kernel, the chunks to the prefill
    kernel."""
    calls = []
    for name in ("prefill_attention", "unified_attention", "paged_decode_attention"):
        monkeypatch.setattr(triton_attention, name, lambda q, *args, name=name, **kwargs: calls.append(name) or q)
    for seqs, window, kernels in [
            ([(0, PREFILL_MIN_QUERY_LEN)], None, ["prefill_attention"]),
            ([(100, PREFILL_MIN_QUERY_LEN), (50, 1), (9, 1)], None, ["prefill_attention"]),
            ([(50, 1), (9, 1), (100, PREFILL_MIN_QUERY_LEN), (0, 40)], None,
             ["paged_decode_attention", "prefill_attention"]),
            ([(0, PREFILL_MIN_QUERY_LEN - 1)], None, ["unified_attention"]),
            ([(0, PREFILL_MIN_QUERY_LEN)], 256, ["unified_attention"]),
            ([(30, 1), (7, 1)], None, ["paged_decode_attention"])]:
        q, k_cache, v_cache, meta = make_batch(seqs, 1, 4, 64, torch.float32)
        triton_attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.125, window)
        assert calls == kernels, (seqs, window)
        calls.clear()


@pytest.mark.parametrize("kind", [None, *CONTIGUOUS])
def test_decodes_then_chunks_by_two_kernels_match_reference(monkeypatch, kind):
    """The entry point on decodes followed by prefill chunks (the threshold lowered so that short
    chunks count as long): the decode kernel's rows and the prefill kernel's rows of one output;
    with the step's keys read apart (the chunks' rows of the step's keys and values), as the
    attention layer passes them."""
    monkeypatch.setattr(prefill_tiles, "PREFILL_MIN_QUERY_LEN", 32)
    if kind is not None:
        tiles = PrefillTiles(16, 32, 4, 2, **CONTIGUOUS[kind])
        monkeypatch.setattr("meshlm.kernels.prefill_attention.prefill_tiles", lambda *args: tiles)
    seqs = [(30, 1), (17, 1), (37, 70), (0, 45)]
    q, k_cache, v_cache, meta = make_batch(seqs, 1, 4, 64, torch.float32)
    expected = paged_attention_reference(q, k_cache.nan_to_num(), v_cache.nan_to_num(), meta, 0.125)
    new_kv = None
    if kind is not None:
        new_kv = take_step_kv(k_cache, v_cache, meta, 4)
        for cache, x in zip((k_cache, v_cache), new_kv):  # the decode kernel reads a decode's own key in the cache
            cache.view(-1, 1, 64)[meta.slot_mapping[:2]] = x[:2]
    for _ in range(2):  # a second layer of the step reuses the split metadata
        got = triton_attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.125, new_kv=new_kv)
        assert (got - expected).abs().max().item() < FP32_MAX_ERROR
    assert any(key[0] == "decodes_then_chunks" for key in meta.derived)


@pytest.mark.parametrize("num_decodes", [1, 2, 3, 5])
def test_split_metadata_is_aligned_whatever_the_count_of_decodes(num_decodes):
    """The chunks' metadata after ``num_decodes`` decodes: the same values as the batch's rows, in
    fresh 16-byte aligned tensors (views after an odd count of int32 rows would not be, and Triton
    compiles a kernel again for each alignment of its pointers)."""
    seqs = [(20 + i, 1) for i in range(num_decodes)] + [(37, 70), (0, 45)]
    _, _, _, meta = make_batch(seqs, 1, 4, 64, torch.float32)
    chunks = triton_attention._rows_metadata(meta, num_decodes, None)
    first_token = num_decodes  # one token each
    for name in ("positions", "slot_mapping", "seq_lens", "block_tables", "query_start_loc"):
        assert getattr(chunks, name).data_ptr() % 16 == 0, name
    assert torch.equal(chunks.positions, meta.positions[first_token:])
    assert torch.equal(chunks.slot_mapping, meta.slot_mapping[first_token:])
    assert torch.equal(chunks.seq_lens, meta.seq_lens[num_decodes:])
    assert torch.equal(chunks.block_tables, meta.block_tables[num_decodes:])
    assert chunks.query_start_loc.tolist() == [0, 70, 115]


def test_entry_point_without_the_step_keys_reads_the_pool(monkeypatch):
    """Tiles with contiguous_kv and no new_kv (a caller that keeps no rotated keys): the entry
    point reads every key from the pool, and gets the reference's result."""
    monkeypatch.setattr(prefill_tiles, "PREFILL_MIN_QUERY_LEN", 32)
    monkeypatch.setattr("meshlm.kernels.prefill_attention.prefill_tiles", lambda *args: PrefillTiles(16, 32, 4, 2, contiguous_kv=True))
    q, k_cache, v_cache, meta = make_batch([(37, 70)], 1, 4, 64, torch.float32)
    expected = paged_attention_reference(q, k_cache.nan_to_num(), v_cache.nan_to_num(), meta, 0.125)
    got = triton_attention.paged_attention_triton(q, k_cache, v_cache, meta, 0.125)
    assert (got - expected).abs().max().item() < FP32_MAX_ERROR


# Llama-3-8B's heads (32 query heads, 8 KV heads, head_dim 128) at 8k tokens on a GPU: a fresh
# prompt, and a batch of chunks after context (one mid-block) with decodes.
LONG = {"1x8k": [(0, 8192)], "chunks": [(3000, 2100), (0, 4096), (4117, 1500), (6000, 1), (100, 1)]}
RELATIVE_TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", LONG)
def test_8b_heads_at_8k_match_reference(name, dtype):
    max_err, relative = errors(LONG[name], 4, dtype, head_dim=128, num_kv_heads=8, seed=1)
    assert relative < RELATIVE_TOLERANCE[dtype], (name, dtype, max_err, relative)


@needs_cuda
@pytest.mark.parametrize("kind", CONTIGUOUS)
@pytest.mark.parametrize("name", LONG)
def test_8b_heads_at_8k_with_step_keys_apart_match_reference(name, kind):
    """The default bf16 tiles reading the step's keys apart: the chunks' keys split between the
    pool (their cached prefix) and the step's tensors."""
    tiles = replace(prefill_tiles.prefill_tiles(128, 4, torch.bfloat16), **CONTIGUOUS[kind])
    max_err, relative = errors(LONG[name], 4, torch.bfloat16, tiles, head_dim=128, num_kv_heads=8, seed=1)
    assert relative < RELATIVE_TOLERANCE[torch.bfloat16], (name, kind, max_err, relative)


@needs_cuda
@pytest.mark.parametrize("tiles", [PrefillTiles(128, 64, 8, 3, pack_gqa=False), PrefillTiles(128, 128, 8, 3),
                                   PrefillTiles(128, 64, 8, 3, k_transposed=True),
                                   PrefillTiles(128, 64, 8, 3), PrefillTiles(64, 64, 4, 4, prefetch_table=True),
                                   PrefillTiles(128, 64, 8, 3, prefetch_table=True, contiguous_kv=True),
                                   PrefillTiles(128, 128, 8, 2, prefetch_table=True, contiguous_kv=True, tma_kv=True),
                                   PrefillTiles(128, 64, 8, 3, k_transposed=True, contiguous_kv=True)],
                         ids=str)
def test_bf16_switches_at_2k(tiles):
    max_err, relative = errors([(500, 2000), (0, 1)], 4, torch.bfloat16, tiles, head_dim=128, num_kv_heads=8)
    assert relative < RELATIVE_TOLERANCE[torch.bfloat16], (tiles, max_err, relative)



@needs_cuda
def test_entry_point_on_decodes_then_long_chunks_in_bf16():
    """The engine's path at the 8B shape: 16 decodes at 3k context, then chunks of 2k and 1.5k."""
    seqs = [(3000 + 37 * i, 1) for i in range(16)] + [(0, 2048), (1000, 1500)]
    q, k_cache, v_cache, meta = make_batch(seqs, 8, 4, 128, torch.bfloat16, seed=2)
    expected = paged_attention_reference(q, k_cache.nan_to_num(), v_cache.nan_to_num(), meta, 128 ** -0.5).float()
    got = triton_attention.paged_attention_triton(q, k_cache, v_cache, meta, 128 ** -0.5).float()
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < RELATIVE_TOLERANCE[torch.bfloat16], relative
    assert any(key[0] == "decodes_then_chunks" for key in meta.derived)
