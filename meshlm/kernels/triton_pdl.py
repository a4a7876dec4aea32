"""The device side of programmatic dependent launch (:func:`meshlm.kernels.triton_launch.programmatic_launch`)."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """First thing in a kernel launched with ``launch_pdl=PDL``: wait until the kernel before it on
    the stream has finished and its writes are visible, then let the next kernel launch. Before
    the wait the kernel must touch no memory; a no-op when PDL is False (and the interpreter has none)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
