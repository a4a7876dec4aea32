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
