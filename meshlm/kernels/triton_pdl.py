"""The device side of programmatic dependent launch (:func:`meshlm.kernels.triton_launch.programmatic_launch`)."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr, LAUNCH_NEXT: tl.constexpr = True):
    """First thing in a kernel launched with ``launch_pdl=PDL``: wait until the kernel before it on
    the stream has finished and its writes are visible, then let the next kernel launch
    (``LAUNCH_NEXT``; without it the next kernel launches as this one's programs exit, so that its
    programs, waiting, take no room on the SMs from this one's later programs). Before the wait the
    kernel must touch no memory; a no-op when PDL is False (and the interpreter has none)."""
    if PDL:
        gdc_wait()
        if LAUNCH_NEXT:
            gdc_launch_dependents()
