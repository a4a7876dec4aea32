"""Launch shape of the prefill attention kernel (:mod:`meshlm.kernels.prefill_attention`) and the
rule that sends a batch to it; plain Python, so that both are testable without Triton."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Launch shape of the prefill kernel and its switches (every switch gives the same result):

    - ``block_m`` tile rows: query tokens of one query head, or with ``pack_gqa`` query tokens x
      the heads of one GQA group (row ``m`` is token ``m // group``, head ``m % group``), so
      that each K/V tile is read once for the whole group;
    - ``block_n`` keys a tile, ``num_warps`` warps a program, ``num_stages`` pipeline depth;
    - ``k_transposed``: keys load directly as [head_dim, keys] instead of as rows along memory
      that the product transposes;
    - ``prefetch_table``: each tile's block ids load one tile ahead, so that its K and V loads
      never wait for a block-table load issued just before them;
    - ``contiguous_kv``: the keys and values of the step's own tokens are read from the step's K
      and V tensors (rows of consecutive tokens, no block table), only those of a cached prefix
      from the paged pool; the caller passes them (``prefill_attention``'s ``new_kv``);
    - ``tma_kv`` (with ``contiguous_kv``): those rows load by tensor descriptors, bulk copies of a
      whole [block_n, head_dim] tile (TMA on Hopper) instead of one address per element.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool = True
    k_transposed: bool = False
    prefetch_table: bool = False
    contiguous_kv: bool = False
    tma_kv: bool = False

    def rows_per_token(self, group: int) -> int:
        return group if self.pack_gqa else 1

    def query_tokens(self, group: int) -> int:
        """Query tokens a program takes (``block_q``)."""
        return self.block_m // self.rows_per_token(group)

    def check(self, group: int) -> None:
        """Refuse a shape the kernel cannot run, naming every size involved."""
        for name, value in (("block_m", self.block_m), ("block_n", self.block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{self}: {name}={value} must be a power of two >= 16 (tensor-core tiles)")
        if self.query_tokens(group) < 1:
            raise ValueError(f"{self}: block_m={self.block_m} rows cannot hold a GQA group of {group} heads")
        if self.tma_kv and not self.contiguous_kv:
            raise ValueError(f"{self}: tma_kv loads the step's own keys, which only contiguous_kv reads apart")


# bf16 / fp16 tiles for heads up to 128 wide: 128 rows (128 query tokens of one head), 128 keys,
# 8 warps (two warpgroups of 64 rows each), 3 stages, block ids a tile ahead: compiled for sm_90
# without them, Triton's pipeliner spends a stage on the block-table load and waits for every copy
# at each tile (one K/V tile in flight); with them, two K/V tiles are in flight. Rows of one head
# ran faster than 32 tokens x a GQA group of 4 (``pack_gqa``, which reads each K/V tile once for
# the group) on an H200: 1 x 8k 55.9 -> 57.4 %, 4 x 8k 55.6 -> 57.8 % of the bf16 GEMM rate
# (benchmarks/prefill_sweep.py). The step's own keys and values read apart from the pool by
# tensor-descriptor (TMA) loads (``contiguous_kv``, ``tma_kv``), in the same run of
# attention_bench.py: 1 x 8k 58.3 -> 65.6 %, 4 x 8k 55.1 -> 59.2 %, 4 x 2k 45.7 -> 48.3 % (pointer
# loads from them alone were slower: 56.3 %, 54.5 %, 43.3 %). 128 keys a tile rather than 64
# (prefill_sweep.py --graph --tma-grid, the whole grid by descriptors, CUDA-graph replays): 3 x 2k
# 297.8 -> 272.6 us, 1 x 8k 1132.5 -> 1030.9 us (61.7 -> 67.8 % of the rate); their three stages
# take 224 KiB of shared memory, so a card with less takes fewer keys (:func:`prefill_tiles`).
_BF16 = PrefillTiles(128, 128, 8, 3, pack_gqa=False, prefetch_table=True, contiguous_kv=True, tma_kv=True)
# fp32 (tests, reference runs) takes small tiles: twice larger elements, and quick to compile.
_FP32 = PrefillTiles(32, 32, 4, 2, pack_gqa=True)

# A batch goes to the prefill kernel when its longest query has at least this many tokens. On an
# H200 (attention_bench.py --graph, the 8B shape), with the tiles above, the prefill kernel took
# 21 us at 1 x 512 against the unified kernel's 22, 58 against 65 at 4 x 512, 31 against 39 at
# 1 x 768, 37 against 57 at 1 x 1k, 270 against 317 at 8 x 1k and 98 against 159 at 1 x 2k; at
# 1 x 256 the unified kernel led (14 us against 17).
PREFILL_MIN_QUERY_LEN = 512
# The step's own keys load by tensor descriptors (``tma_kv``) when the step has at least this many
# query tokens, by pointers below: on an H200 pointers led at 1 x 256 (13.9 us against 17.6), 1 x 512
# (18.0 against 21.1) and 1 x 768 (28.4 against 30.6), tied at 1 x 1024 and trailed from 2 x 1024
# (72.4 against 71.2) and 8 x 1000 (284.2 against 270.0) on.
TMA_MIN_TOKENS = 1024
# ... and when the rows its tiles leave empty (short queries padded to a program's query tokens:
# decodes mixed into the step) are at most this fraction of the batch's query tokens.
_MAX_PADDING_FRACTION = 0.25
PREFILL_HEAD_DIMS = (64, 128)
# Shared memory one program may take on sm_90 (H100, H200: the opt-in limit of 227 KiB a block),
# less a margin for what Triton keeps beside the tiles (its barriers).
SHARED_MARGIN_BYTES = 1024
SM90_SHARED_BYTES = 232448 - SHARED_MARGIN_BYTES


def tile_shared_bytes(tiles: PrefillTiles, head_dim: int, element_size: int) -> int:
    """Shared memory of the kernel's tiles: ``num_stages`` K and V tiles in flight and the Q tile."""
    return (2 * tiles.num_stages * tiles.block_n + tiles.block_m) * head_dim * element_size


@functools.lru_cache(maxsize=None)  # every attention layer of every step asks: a few shapes a model
def prefill_tiles(head_dim: int, group: int, dtype: torch.dtype, shared_bytes: int = SM90_SHARED_BYTES) -> PrefillTiles:
    """The prefill kernel's launch shape for a model's heads; rows hold at least a whole GQA group,
    and keys a tile halve until the tiles fit in ``shared_bytes`` (the card's limit a program)."""
    tiles = _FP32 if dtype == torch.float32 else _BF16
    group_rows = 1 << (group - 1).bit_length() if tiles.pack_gqa else 1
    tiles = replace(tiles, block_m=max(tiles.block_m, group_rows))
    element_size = dtype.itemsize
    while tiles.block_n > 16 and tile_shared_bytes(tiles, head_dim, element_size) > shared_bytes:
        tiles = replace(tiles, block_n=tiles.block_n // 2)
    return tiles


def uses_prefill_kernel(query_lens: np.ndarray, dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int,
                        group: int, sliding_window: int | None, tiles: PrefillTiles) -> bool:
    """Whether the batch with host query lengths ``query_lens`` [num_seqs] runs the prefill kernel.

    Only long prefills do (the longest query at least ``PREFILL_MIN_QUERY_LEN`` tokens), and only
    when the short queries mixed in (decodes: one token in a program of ``block_q``) leave at most
    a quarter of the batch's size in empty rows. Sliding windows, caches in another dtype than q
    (float8) and heads other than 64 or 128 wide stay on the unified kernel, which handles them.
    """
    if (len(query_lens) == 0 or sliding_window is not None or kv_dtype != dtype
            or head_dim not in PREFILL_HEAD_DIMS or dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return False
    if int(query_lens.max()) < PREFILL_MIN_QUERY_LEN:
        return False
    block_q = tiles.query_tokens(group)
    padded = (-query_lens) % block_q  # [num_seqs] empty rows of each sequence's last program
    return int(padded.sum()) <= _MAX_PADDING_FRACTION * int(query_lens.sum())


def num_leading_decodes(query_lens: np.ndarray) -> int:
    """How many decodes (one query token) open a batch whose other sequences are all prefill chunks,
    the scheduler's order; 0 for a batch in any other order. Such a batch can run its decodes and
    its chunks by two kernels, each over a contiguous range of its sequences and tokens."""
    num_decodes = int((query_lens == 1).sum())
    return num_decodes if bool((query_lens[:num_decodes] == 1).all()) else 0
