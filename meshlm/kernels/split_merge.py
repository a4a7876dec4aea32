"""The second step of split-KV ("flash decoding") attention: each query head's output from the
normalised partial outputs of its splits and their log2-sum-exp
(:mod:`meshlm.kernels.decode_attention` writes them)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Splits the merge kernel loads per tile ([64, 128] fp32 is 32 KiB: 64 registers a thread at 4 warps).
_MERGE_SPLITS_CHUNK = 64


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(out_ptr, partial_ptr, lse_ptr, num_splits, stride_o_token, stride_o_head,
                         HEAD_DIM: tl.constexpr, SPLITS_CHUNK: tl.constexpr):
    """out[seq, head] = the splits' partial outputs weighted by exp2(lse - max lse).

    The splits load ``SPLITS_CHUNK`` at a time as one [SPLITS_CHUNK, HEAD_DIM] tile: a loop of one
    load per split waits out the memory latency once per split, which at batch 1 (few programs,
    up to 64 splits) cost tens of microseconds per layer."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq.to(tl.int64) * tl.num_programs(1) + head
    chunk = tl.arange(0, SPLITS_CHUNK)
    dims = tl.arange(0, HEAD_DIM)
    lse_max = tl.full([], float("-inf"), dtype=tl.float32)
    for start in range(0, num_splits, SPLITS_CHUNK):
        lse = tl.load(lse_ptr + row * num_splits + start + chunk, mask=start + chunk < num_splits,
                      other=float("-inf"))
        lse_max = tl.maximum(lse_max, tl.max(lse, 0))
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    denom = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, num_splits, SPLITS_CHUNK):
        split = start + chunk
        is_split = split < num_splits
        weight = tl.math.exp2(tl.load(lse_ptr + row * num_splits + split, mask=is_split,
                                      other=float("-inf")) - lse_max)  # [SPLITS_CHUNK]
        denom += tl.sum(weight, 0)
        part = tl.load(partial_ptr + (row * num_splits + split)[:, None] * HEAD_DIM + dims[None, :],
                       mask=is_split[:, None], other=0.0)  # [SPLITS_CHUNK, HEAD_DIM]
        acc += tl.sum(weight[:, None] * part, 0)
    acc = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_token + head * stride_o_head + dims,
             acc.to(out_ptr.dtype.element_ty))


def merge_splits(out: torch.Tensor, partial: torch.Tensor, lse: torch.Tensor) -> None:
    """out [num_seqs, num_heads, head_dim] from the splits' partial outputs and log2-sum-exps."""
    num_seqs, num_heads, num_splits, head_dim = partial.shape
    _decode_merge_kernel[(num_seqs, num_heads)](
        out, partial, lse, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, SPLITS_CHUNK=min(triton.next_power_of_2(num_splits), _MERGE_SPLITS_CHUNK), num_warps=4)
