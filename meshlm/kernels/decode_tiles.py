"""Launch shape of the split-KV decode kernel (:mod:`meshlm.kernels.decode_attention`): tiles, the
kernel's variant switches and the split count, chosen from a batch's host sizes; plain Python, so
that the choice is testable without Triton."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshlm.kernels.triton_launch import CPU_NUM_SMS

# Programs per SM that the splits aim for: enough to hide memory latency on every SM (on an H200,
# 64 sequences x 2k keys ran 10 % faster in 2 splits than in 1).
_PROGRAMS_PER_SM = 4
# Up to this many (sequence, KV head) programs per SM, 128-key tiles read faster; beyond it, 64-key
# tiles (attention_bench.py --sweep on an H200: 1 x 32k, 8 x 8k and 64 x 2k against 256 x 1k, 1024 x 256).
_LARGE_TILE_PROGRAMS_PER_SM = 4
# Up to one (sequence, KV head) pair per this many SMs (a sequence or two of 8 KV heads on an
# H200), 16-bit KV read fastest in small tiles of two KV heads (the variant sweep at 1 x 32k).
_SMS_PER_PAIR = 8
# A split covers at least this many keys: shorter splits cost more in merging than they give.
_MIN_KEYS_PER_SPLIT = 256
_MAX_SPLITS = 64
# DecodeTiles.fp8_widen -> how the kernel widens (keys, values): 0 conversion unit, 1 bit moves in
# Triton ops, 2 bit moves in PTX, 3 loaded as 32-bit words, widened in PTX (off the GPU: 4, in
# Triton ops) (kernels/fp8_convert_triton.py).
FP8_WIDEN = {"cvt": (0, 0), "bits": (1, 1), "asm": (2, 2), "asm_k": (2, 0), "words_v": (0, 3), "words": (3, 3)}
_OFF_GPU = {2: 1, 3: 4}  # what runs in the interpreter for a code that needs PTX


@dataclass(frozen=True, slots=True)
class DecodeTiles:
    """Launch shape of the split kernel: keys per tile, warps per program, pipeline depth, and how a
    tile reaches the cache (every switch but ``fp8_qk`` gives the same result; they differ in speed):

    - ``prefetch_table``: the block ids of each tile load this many tiles ahead (0, 1 or 2), so
      that a tile's K and V loads never wait for a block-table load issued just before them
      (Triton's pipeliner does not prefetch an indirect load at 2 stages);
    - ``k_transposed``: keys load directly as [head_dim, keys] instead of as rows along memory
      that are transposed in registers;
    - ``paged_tile``: a tile is a whole number of cache blocks, with one block-table load per
      block instead of one per key (``block_n`` a multiple of the cache's block size);
    - ``heads_first``: the grid runs (KV head, sequence, split), so that the programs of one
      sequence's KV heads start side by side and read each cache block (16 keys x every KV head,
      contiguous) together, instead of one KV head of every sequence before the next head;
    - ``kv_heads_per_program``: a program attends this many neighbouring KV heads at once: a tile
      holds each of its ``block_n`` keys for every one of them (rows of ``kv_heads_per_program`` x
      256 bytes along memory), and the query rows of all their groups fill the 16 rows a GQA group
      of 4 pads to; a row's scores outside its own head are masked;
    - ``splits_first``: the grid runs (split, ...), so that the splits of one (sequence, KV heads)
      pair start side by side instead of every pair's first split before any second split;
    - ``fused_merge``: the splits are merged inside the split kernel, by the last split of each
      pair to finish (:func:`meshlm.kernels.split_merge.merge_if_last`), instead of by a second
      kernel; splits past a sequence's keys then end at once, storing nothing, and a sequence
      whose keys fit one split writes its output directly;
    - ``min_split_tiles``: a split covers at least this many tiles, so that a sequence much
      shorter than the split count assumes (the decode graphs split for the model's length)
      takes fewer splits, down to one, which (``fused_merge``) then needs no merge;
    - ``max_registers``: a cap on each thread's registers (None: the compiler's choice), so that
      more programs fit on an SM (on sm_90 the kernel's registers, not its shared memory, limit
      it to 2 or 3 programs of 4 warps an SM), at the cost of spilling what does not fit.
    - ``swap_ab``: the cache tiles are the products' first operand: scores^T = K q^T and
      out^T = V^T p^T, so that a tile's keys (and head_dim) are the matrix unit's rows instead of
      the query group's padded rows: at 64 keys or more Hopper's warpgroup MMA runs, with the
      widened keys taken from registers rather than written back to shared memory;
    - ``min_group_rows``: the query group's rows pad to at least this many (16: the smallest
      MMA's rows; 8 is the smallest MMA column count, enough with ``swap_ab``);
    - ``fp8_widen``: how a float8 tile becomes 16-bit for the product (fp8 pools only): "cvt"
      the conversion unit, "asm" moving bits four values at a time in PTX (:mod:`meshlm.kernels.
      fp8_convert_triton`; the factor 2^8 it leaves folds into the scores and probabilities), "asm_k" keys
      that way and values by the conversion unit (the two run on different units), "bits" the
      same bit moves in plain Triton ops; "words_v" loads values as 32-bit words of four float8
      and widens each word by the conversion unit in PTX, so that a loaded tile stays four values a
      register (a float8 tile that crosses the software pipeline's loop may take a byte a register,
      repacked in pairs for the conversion); "words" loads keys that way too (keys as rows, no
      ``k_transposed``). Off the GPU "asm" runs as "bits", "words_v" and "words" in Triton ops;
    - ``fp8_qk`` (fp8 pools only; changes the result): q is quantized per row to float8 e4m3 and
      multiplies the stored keys on float8 tensor cores, so that keys need no widening; it adds
      q's own e4m3 rounding to the scores;
    - ``sum_at_end``: the rows' running sum of probabilities is kept per tile column and added up
      once after the last tile, instead of summed over each tile's keys: with ``swap_ab`` those
      lie in every warp, and the sum crossed warps through shared memory, with barriers, each tile;
    - ``tma_kv`` (16-bit pools, no sliding window): the kernel of :mod:`meshlm.kernels.decode_tma`,
      which loads each cache block of keys and of values by one bulk copy (a tensor descriptor)
      and takes ``block_n`` (one or two cache blocks), ``num_warps``, ``num_stages``,
      ``prefetch_table`` (2: block ids two tiles ahead, else one), ``kv_heads_per_program``,
      ``heads_first``, ``min_group_rows`` and ``max_registers`` only;
      a batch it cannot take runs the pointer kernel with the other switches. No default takes
      it: at its fastest launches it ran 39.9 us at 1 x 32k against the default's 39.6, and 77.7
      us at 8 x 8k against 73.6 (interleaved rounds on one H200, ``decode_counters.py --tma-grid``).
    """

    block_n: int
    num_warps: int
    num_stages: int
    prefetch_table: int = 0
    k_transposed: bool = False
    paged_tile: bool = False
    heads_first: bool = False
    kv_heads_per_program: int = 1
    splits_first: bool = False
    fused_merge: bool = False
    min_split_tiles: int = 1
    max_registers: int | None = None
    swap_ab: bool = False
    min_group_rows: int = 16
    fp8_widen: str = "cvt"
    fp8_qk: bool = False
    sum_at_end: bool = False
    tma_kv: bool = False

    def check(self, kv_block_size: int, num_kv_heads: int) -> None:
        """Refuse a shape the kernel cannot run, naming every size involved."""
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"{self}: block_n={self.block_n} must be a power of two >= 16")
        if self.prefetch_table not in (0, 1, 2):
            raise ValueError(f"{self}: prefetch_table={self.prefetch_table} must be 0, 1 or 2 (tiles ahead)")
        heads = self.kv_heads_per_program
        if heads < 1 or heads & (heads - 1) or num_kv_heads % heads:
            raise ValueError(f"{self}: kv_heads_per_program={heads} must be a power of two that divides "
                             f"the {num_kv_heads} KV heads")
        if self.min_split_tiles < 1:
            raise ValueError(f"{self}: min_split_tiles={self.min_split_tiles} must be at least 1")
        if self.max_registers is not None and not 32 <= self.max_registers <= 255:
            raise ValueError(f"{self}: max_registers={self.max_registers} must lie in [32, 255] (or be None)")
        if self.k_transposed and self.swap_ab:
            raise ValueError(f"{self}: swap_ab multiplies keys as loaded, rows along memory: no k_transposed")
        if self.min_group_rows < 1 or self.min_group_rows & (self.min_group_rows - 1):
            raise ValueError(f"{self}: min_group_rows={self.min_group_rows} must be a power of two")
        if self.fp8_widen not in FP8_WIDEN:
            raise ValueError(f"{self}: fp8_widen={self.fp8_widen!r}; choose one of {', '.join(FP8_WIDEN)}")
        if (self.k_transposed or self.fp8_qk) and FP8_WIDEN[self.fp8_widen][0] >= 3:
            raise ValueError(f"{self}: fp8_widen={self.fp8_widen!r} loads keys as words of a row, to widen: no "
                             f"k_transposed={self.k_transposed}, no fp8_qk={self.fp8_qk}")
        if self.paged_tile and self.block_n % kv_block_size:
            raise ValueError(f"{self}: paged_tile needs block_n={self.block_n} to be a multiple of "
                             f"the cache's block size {kv_block_size}")

    def tile_switches(self, on_gpu: bool) -> dict:
        """The kernel's constexprs for ``swap_ab``, ``fp8_widen`` (off the GPU, PTX runs as Triton
        ops), ``fp8_qk`` and ``sum_at_end``."""
        widen_k, widen_v = (code if on_gpu else _OFF_GPU.get(code, code) for code in FP8_WIDEN[self.fp8_widen])
        return dict(SWAP_AB=self.swap_ab, WIDEN_K=widen_k, WIDEN_V=widen_v, FP8_QK=self.fp8_qk,
                    SUM_AT_END=self.sum_at_end)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Splits per sequence: enough (sequence, KV head, split) programs for ``_PROGRAMS_PER_SM``
    per SM, each split at least ``_MIN_KEYS_PER_SPLIT`` keys of ``max_seq_len``, at most
    ``_MAX_SPLITS``. Depends on host sizes only, never on the step's sequence lengths."""
    num_programs = num_seqs * num_kv_heads
    wanted = -(-_PROGRAMS_PER_SM * num_sms // num_programs)
    by_length = max(1, max_seq_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


def decode_tiles(dtype: torch.dtype, num_programs: int = 1, num_sms: int = CPU_NUM_SMS,
                 kv_fp8: bool = False, num_kv_heads: int = 1) -> DecodeTiles:
    """Tiles and switches of the split kernel for ``num_programs`` (sequence, KV head) pairs on
    ``num_sms`` SMs, over a 16-bit or (``kv_fp8``) float8 pool of ``num_kv_heads`` KV heads a rank.

    From the variant sweeps (``benchmarks/decode_variants.py``) on an H200 (kernels replayed in
    CUDA graphs, as the engine runs decode steps; per cent of copy bandwidth, the earlier default
    -> this one):
    - 16-bit KV, a sequence or two (``_SMS_PER_PAIR``): 32-key tiles in 3 stages, block ids two
      tiles ahead, two KV heads a program: 1 x 32k 71.6 -> 76.5 % (it lost at 8 x 8k);
    - 16-bit KV, few pairs (long contexts in small batches): 128-key tiles, block ids two tiles
      ahead, keys loaded transposed: 8 x 8k 79 -> 90 %;
    - 16-bit KV, many pairs: 64-key tiles, a sequence's KV heads side by side in the grid:
      256 x 1k 99.6 -> 101.7 %, 1024 x 256 94.9 -> 97.4 % (against a read+write copy);
    - fp8 KV, a sequence or two: 64-key tiles in 2 stages, block ids two ahead, two KV heads a
      program: 1 x 32k 50.2 -> 51.4 %;
    - fp8 KV, few pairs: 128-key tiles in 3 stages, block ids two ahead: 8 x 8k 49.3 -> 59.9 %;
    - fp8 KV, many pairs: 64-key tiles, block ids two ahead, two KV heads a program, at most 128
      registers a thread (``max_registers``: more programs resident on an SM): 256 x 1k 66.3 ->
      82.1 %. The earlier default (the cache tile as the products' first operand, the group padded
      to 8 rows, values loaded as words: ``swap_ab``, ``min_group_rows=8``, ``fp8_widen="words_v"``)
      issues fewer instructions (1,170 warp instructions per 64 keys against 2,820,
      ``benchmarks/decode_sass.py``) but ran slower than these tiles: over an fp8 pool the kernel
      wanted resident warps to hide its conversions, more than fewer instructions (``sum_at_end``,
      untimed, takes those tiles to 1,112).
    Splits merge in a second kernel where a step has them (few pairs). With the merge folded into
    the split kernel (``fused_merge``) 1 x 32k measured slower on the H200: bf16 54.5 us (58 %;
    these tiles with the merge kernel 76.5 % in the sweep, the earlier 128-key default 45.1 us,
    72 %), fp8 with ``swap_ab``, 8 rows and words 40.3 us (39 %, against 52 % for the tiles
    below); the two changes were not timed apart, so both stay switches for the few-pair
    defaults. Many pairs run one split, where the merge does not arise.
    fp32 (tests): 32-key tiles, which keep its twice larger tiles within shared memory and compile
    quickly."""
    if dtype == torch.float32:
        return DecodeTiles(block_n=32, num_warps=4, num_stages=2)
    is_few = num_programs <= _LARGE_TILE_PROGRAMS_PER_SM * num_sms
    two_heads = 2 if num_kv_heads % 2 == 0 else 1
    if kv_fp8 and num_programs * _SMS_PER_PAIR <= num_sms:
        return DecodeTiles(block_n=64, num_warps=4, num_stages=2, prefetch_table=2, heads_first=True,
                           kv_heads_per_program=two_heads)
    if kv_fp8 and is_few:
        return DecodeTiles(block_n=128, num_warps=4, num_stages=3, prefetch_table=2, heads_first=True)
    if kv_fp8:
        return DecodeTiles(block_n=64, num_warps=4, num_stages=2, prefetch_table=2, heads_first=True,
                           kv_heads_per_program=two_heads, max_registers=128)
    if num_programs * _SMS_PER_PAIR <= num_sms:
        return DecodeTiles(block_n=32, num_warps=4, num_stages=3, prefetch_table=2, kv_heads_per_program=two_heads)
    if is_few:
        return DecodeTiles(block_n=128, num_warps=4, num_stages=2, prefetch_table=2, k_transposed=True)
    return DecodeTiles(block_n=64, num_warps=4, num_stages=2, heads_first=True)
