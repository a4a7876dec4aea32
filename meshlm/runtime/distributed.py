"""Start the runtime for this process: one rank here, or many under MPI."""
from __future__ import annotations

from meshlm.runtime.args import EngineArgs


def start_runtime(args: EngineArgs):
    """A coordinator-like object for rank 0 of the layout ``args`` asks for."""
    world = args.tensor_parallel_size * args.pipeline_parallel_size
    if world == 1:
        from meshlm.runtime.build import build_local_coordinator
        return build_local_coordinator(args)
    raise NotImplementedError("multi-rank layouts need the MPI launcher")
