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


@functools.cache
def _has_programmatic_launch(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
