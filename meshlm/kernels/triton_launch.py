"""Launch facts the Triton kernels share: the device's SM count (with the count assumed under the
CPU interpreter) and the dot precision for fp32 inputs."""
from __future__ import annotations

import functools

import torch

# The SM count assumed off the GPU (the interpreter), so that CPU tests split as a GPU would.
CPU_NUM_SMS = 8


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(x: torch.Tensor) -> str:
    """fp32 inputs: three TF32 products on the GPU (fp32 accuracy on tensor cores; plain TF32
    would lose about three decimal digits), exact products in the CPU interpreter."""
    if x.dtype != torch.float32:
        return "tf32"  # not used for 16-bit inputs
    return "tf32x3" if x.is_cuda else "ieee"


def launch_counters(buffers: dict, device: torch.device, size: int, needed: int) -> torch.Tensor | None:
    """A device's int32 counters for kernels whose last program of a group counts itself done and
    zeroes the count again (split-K reductions, split-KV merges): one buffer of ``size`` per device
    in ``buffers``, made by the first eager call. None during a CUDA graph capture before any eager
    call (its allocation would belong to the graph), or when ``needed`` exceeds ``size``: the caller
    then takes its two-kernel path. Launches that use a buffer run one after another on one stream,
    as a rank's model does."""
    counters = buffers.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        counters = buffers[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return counters if needed <= counters.numel() else None


# Programmatic dependent launch (sm_90+): a kernel launched with it may start while the kernel
# before it on the stream finishes; it waits (griddepcontrol.wait) before its first memory access,
# so only the launch and the scheduling of its programs overlap the previous kernel's tail. On by
# default where the GPU has it; set_programmatic_launch(False) turns it off (benchmarks compare).
_PROGRAMMATIC_LAUNCH = {"enabled": True}


def set_programmatic_launch(enabled: bool) -> None:
    """Whether Triton kernels launched from now on use programmatic dependent launch."""
    _PROGRAMMATIC_LAUNCH["enabled"] = enabled


def programmatic_launch(device: torch.device) -> bool:
    """Launch with programmatic dependent launch on ``device``: a CUDA GPU of compute capability
    9.0 or newer, unless turned off. The kernel's ``PDL`` constexpr and ``launch_pdl`` both take it."""
    return _PROGRAMMATIC_LAUNCH["enabled"] and _has_programmatic_launch(device)


# Whether the one-row weight product (kernels/gemv_triton.py) loads its first weight tile before
# waiting for the kernel ahead: a weight is written by no kernel of a step, so programs resident
# while that kernel ends start streaming it. On by default: on an H200, batch-1 decode steps of the
# Llama-3-8B shape 2.92 -> 2.86 ms (FP8) and 4.23 -> 4.16 ms (bf16). The small-batch MMA kernel
# measured slower with it (16 rows, FP8: 3.75 -> 3.86 ms) and has none (benchmarks/RESULTS.md).
_WEIGHT_PRELOAD = {"enabled": True}


def set_weight_preload(enabled: bool) -> None:
    """Whether one-row products launched from now on load their first weight tile before the wait."""
    _WEIGHT_PRELOAD["enabled"] = enabled


def weight_preload(device: torch.device) -> bool:
    """Whether a one-row product on ``device`` loads its first weight tile before the wait (only
    with programmatic dependent launch; the interpreter, which has none, takes the switch as it is)."""
    return _WEIGHT_PRELOAD["enabled"] and (device.type != "cuda" or programmatic_launch(device))


@functools.cache
def _has_programmatic_launch(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
