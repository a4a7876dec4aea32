"""Where the kernel tests run: on a CUDA GPU, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); skipped elsewhere. ``pytestmark = KERNEL_MARKS`` in a test module."""
from __future__ import annotations

import os

import pytest
import torch

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not IS_INTERPRETED else "cpu"

KERNEL_MARKS = [pytest.mark.gpu,
                pytest.mark.skipif(not HAS_CUDA and not IS_INTERPRETED,
                                   reason="needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")]
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
