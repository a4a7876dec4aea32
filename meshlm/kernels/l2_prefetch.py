"""Ask the GPU's L2 cache for a weight before the product that reads it.

A decode step of a few rows reads every weight once and little else; between its products run
small kernels (norms, rotary and the KV-cache store, attention, SiLU) that move few bytes, so the
memory idles during them, and each product then starts from cold with its ramp-up. A prefetch
kernel in such a gap issues bulk L2 prefetches (``cp.async.bulk.prefetch.L2``, sm_90) for the first
bytes of the next weight and ends: the bytes stream into L2 while the small kernels run, and the
product finds them there. Nothing waits for the prefetches and nothing reads their result, so the
output is the same with them or without them; only the time changes.

Off by default, by site (the weight a gap prefetches): ``set_l2_prefetch(o_proj=..., ...)`` gives
the bytes each site may prefetch; benchmarks/profile_decode.py times them (``--l2-prefetch``).
Prefetches run only for batches of at most ``PREFETCH_MAX_ROWS`` rows (the products bound by their
weight's bytes), on CUDA GPUs of compute capability 9.0 or newer; elsewhere a call does nothing.
"""
from __future__ import annotations

import functools

import torch

from meshlm.kernels.triton_launch import programmatic_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: prefetches do nothing
    triton = None

__all__ = ["PREFETCH_SITES", "PREFETCH_MAX_ROWS", "prefetch_weight", "prefetch_bytes", "set_l2_prefetch"]

# The weights a decoder layer's gaps may prefetch: the output projection (after the QKV product,
# over rotary and attention), gate/up (after the output projection, over the norm), down (after
# gate/up, over SiLU-and-mul) and the next layer's QKV (after down, over the norm).
PREFETCH_SITES = ("o_proj", "gate_up", "down", "qkv")
PREFETCH_MAX_ROWS = 16
_CHUNK = 16384  # bytes one prefetch instruction asks for
_BLOCK = 128  # prefetches a program issues (one a thread of its 4 warps)
_SITE_BYTES: dict[str, int] = {site: 0 for site in PREFETCH_SITES}


def set_l2_prefetch(**site_bytes: int) -> None:
    """Bytes each named site prefetches from now on (0: none; at most the weight's size is asked for).
    CUDA graphs captured afterwards hold the prefetches."""
    for site, num_bytes in site_bytes.items():
        if site not in _SITE_BYTES:
            raise ValueError(f"unknown prefetch site {site!r}; choose from {', '.join(PREFETCH_SITES)}")
        if num_bytes < 0:
            raise ValueError(f"prefetch bytes for {site!r} must be non-negative, got {num_bytes}")
        _SITE_BYTES[site] = int(num_bytes)


def prefetch_bytes(site: str, weight: torch.Tensor, num_rows: int) -> int:
    """Bytes of ``weight`` (from its start) that ``site`` prefetches for a batch of ``num_rows`` rows:
    whole chunks, none off a capable GPU, above PREFETCH_MAX_ROWS or when the site is off."""
    wanted = _SITE_BYTES[site]
    if not wanted or num_rows > PREFETCH_MAX_ROWS or not _capable(weight.device):
        return 0
    if not weight.is_contiguous():
        return 0
    size = weight.numel() * weight.element_size()
    return min(wanted, size) // _CHUNK * _CHUNK


def prefetch_weight(site: str, weight: torch.Tensor | None, num_rows: int) -> None:
    """Launch the prefetch of ``site``'s bytes of ``weight`` (nothing when there are none)."""
    if weight is None:
        return
    num_bytes = prefetch_bytes(site, weight, num_rows)
    if not num_bytes:
        return
    num_chunks = num_bytes // _CHUNK
    pdl = programmatic_launch(weight.device)
    _prefetch_kernel[(triton.cdiv(num_chunks, _BLOCK),)](
        weight.view(-1).view(torch.uint8), num_chunks, CHUNK=_CHUNK, BLOCK=_BLOCK, PDL=pdl, launch_pdl=pdl,
        num_warps=4)


@functools.cache
def _capable(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


if triton is not None:
    from meshlm.kernels.triton_pdl import wait_for_previous_kernel

    @triton.jit
    def _prefetch_kernel(base_ptr, num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # The weight is written by no kernel of the step: the prefetches go out before the wait
        # for the kernel ahead. The wait stays, so that the kernel after this one (which waits
        # only for this one) still runs after the kernel ahead has finished.
        chunks = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        chunks = tl.minimum(chunks, num_chunks - 1)  # the last program's spare threads repeat a chunk
        addresses = (base_ptr + chunks.to(tl.int64) * CHUNK).to(tl.int64, bitcast=True)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                  [addresses, tl.full([BLOCK], CHUNK, tl.int32)], dtype=tl.int32,
                                  is_pure=False, pack=1)
        wait_for_previous_kernel(PDL)
