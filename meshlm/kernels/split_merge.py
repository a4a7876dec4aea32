"""The second step of split-KV ("flash decoding") attention: each query head's output from the
normalised partial outputs of its splits and their log2-sum-exp
(:mod:`meshlm.kernels.decode_attention` writes them).

Two ways: a kernel of its own after the split kernel (:func:`merge_splits`), or inside the split
kernel (:func:`merge_if_last`): each split of a (sequence, KV heads) pair counts itself done on an
atomic counter of the pair, and the last one to finish merges the pair's splits in a fixed order
(the same result whichever finishes last) and zeroes the counter for the next launch. Both merge
with :func:`merge_rows`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshlm.kernels.triton_launch import launch_counters, programmatic_launch
from meshlm.kernels.triton_pdl import wait_for_previous_kernel

# Elements of [rows, splits, head_dim] fp32 partial outputs loaded at once (32 KiB, 64 registers a
# thread at 4 warps), and at most so many splits. A loop of one load per split waits out the memory
# latency once per split, which at batch 1 (few programs, up to 64 splits) cost tens of
# microseconds per layer.
_MERGE_TILE_ELEMENTS = 8192
_MERGE_MAX_CHUNK = 64
# Pairs one launch may count (the counters of the merge inside the split kernel: 256 KiB a device).
_MAX_COUNTED_PAIRS = 65536
_COUNTERS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def merge_rows(out_ptr, partial_ptr, lse_ptr, seq, first_head, num_heads, num_splits, num_active,
               stride_o_token, stride_o_head, NUM_ROWS: tl.constexpr, ROWS: tl.constexpr,
               HEAD_DIM: tl.constexpr, SPLITS_CHUNK: tl.constexpr):
    """out[seq, first_head + row] for the NUM_ROWS rows from their first ``num_active`` splits
    (partial [num_seqs, num_heads, num_splits, HEAD_DIM], lse [..., num_splits]): the partial
    outputs weighted by exp2(lse), ``SPLITS_CHUNK`` splits of every row loaded as one tile, an
    online maximum carried from chunk to chunk. ROWS: NUM_ROWS rounded up to a power of two."""
    rows = tl.arange(0, ROWS)
    is_row = rows < NUM_ROWS
    part_rows = (seq.to(tl.int64) * num_heads + first_head + rows) * num_splits  # [ROWS]
    chunk = tl.arange(0, SPLITS_CHUNK)
    dims = tl.arange(0, HEAD_DIM)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for start in range(0, num_active, SPLITS_CHUNK):
        parts = part_rows[:, None] + start + chunk[None, :]  # [ROWS, SPLITS_CHUNK]
        is_part = is_row[:, None] & (start + chunk < num_active)[None, :]
        # .cg: from L2, where the other programs' stores are (not a stale line of this SM's L1)
        lse = tl.load(lse_ptr + parts, mask=is_part, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(partial_ptr + parts[:, :, None] * HEAD_DIM + dims[None, None, :], mask=is_part[:, :, None],
                       other=0.0, cache_modifier=".cg")  # [ROWS, SPLITS_CHUNK, HEAD_DIM]
        m_new = tl.maximum(m_i, tl.max(lse, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split with keys yet: weights 0, not NaN
        alpha = tl.math.exp2(m_i - m_shift)
        weight = tl.math.exp2(lse - m_shift[:, None])  # [ROWS, SPLITS_CHUNK]
        denom = denom * alpha + tl.sum(weight, 1)
        acc = acc * alpha[:, None] + tl.sum(weight[:, :, None] * part, 1)
        m_i = m_new
    acc = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    heads = first_head + rows
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_token + heads[:, None] * stride_o_head + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=is_row[:, None])


@triton.jit
def merge_if_last(out_ptr, partial_ptr, lse_ptr, counter_ptr, pair, seq, first_head, num_heads, num_splits,
                  num_active, stride_o_token, stride_o_head, NUM_ROWS: tl.constexpr, ROWS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SPLITS_CHUNK: tl.constexpr):
    """Called by each of the ``num_active`` splits of ``pair`` after storing its partial output:
    the last to arrive merges the pair's rows (:func:`merge_rows`) and zeroes its counter. The
    barrier orders every thread's stores before the release of the count; the acquire orders the
    merging program's loads after the other splits' stores."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr + pair, 1, sem="acq_rel", scope="gpu")
    if done == num_active - 1:
        merge_rows(out_ptr, partial_ptr, lse_ptr, seq, first_head, num_heads, num_splits, num_active,
                   stride_o_token, stride_o_head, NUM_ROWS, ROWS, HEAD_DIM, SPLITS_CHUNK)
        tl.atomic_xchg(counter_ptr + pair, 0, sem="relaxed", scope="gpu")  # zero for the next launch


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(out_ptr, partial_ptr, lse_ptr, num_splits, stride_o_token, stride_o_head,
                         HEAD_DIM: tl.constexpr, SPLITS_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """out[seq, head] from all the splits of the row."""
    wait_for_previous_kernel(PDL)
    merge_rows(out_ptr, partial_ptr, lse_ptr, tl.program_id(0), tl.program_id(1), tl.num_programs(1), num_splits,
               num_splits, stride_o_token, stride_o_head, 1, 1, HEAD_DIM, SPLITS_CHUNK)


def merge_splits(out: torch.Tensor, partial: torch.Tensor, lse: torch.Tensor) -> None:
    """out [num_seqs, num_heads, head_dim] from the splits' partial outputs and log2-sum-exps."""
    num_seqs, num_heads, num_splits, head_dim = partial.shape
    pdl = programmatic_launch(out.device)
    _decode_merge_kernel[(num_seqs, num_heads)](
        out, partial, lse, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_CHUNK=merge_chunk(1, num_splits, head_dim), num_warps=4, PDL=pdl, launch_pdl=pdl)


def merge_chunk(num_rows: int, num_splits: int, head_dim: int) -> int:
    """Splits :func:`merge_rows` loads at once for ``num_rows`` rows (a power of two)."""
    return max(1, min(triton.next_power_of_2(num_splits), _MERGE_MAX_CHUNK,
                      _MERGE_TILE_ELEMENTS // (num_rows * head_dim)))


def split_counters(device: torch.device, num_pairs: int) -> torch.Tensor | None:
    """The count of finished splits of each (sequence, KV heads) pair (:func:`launch_counters`;
    None: the splits are merged by :func:`merge_splits`)."""
    return launch_counters(_COUNTERS, device, _MAX_COUNTED_PAIRS, num_pairs)
