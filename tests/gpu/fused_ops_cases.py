"""What the fused-op kernel tests share (tests/gpu/test_fused_ops_gpu.py, test_fused_ops_fp8_gpu.py):
the kernels' ops, inputs on the test's device, and the tolerance of a kernel against torch's ops."""
from __future__ import annotations

import torch

from meshlm.kernels.fused_ops import TritonOps
from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED

TRITON_OPS = TritonOps()
EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol): fp32 differs by reduction order only; a 16-bit output may land one step apart
# where the fp32 value sits on a rounding boundary (two steps after two roundings).
TOLERANCES = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 1e-5),
              torch.bfloat16: (3.2e-2 if IS_INTERPRETED else 1.6e-2, 1e-5)}


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape)
    rtol, atol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
