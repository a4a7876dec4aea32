"""Start the runtime for this process: one rank here, ranks of the MPI world we are in, or a
new MPI world started from this plain process."""
from __future__ import annotations

import atexit
import logging
import sys

from meshlm.parallel.mapping import Mapping
from meshlm.config import EngineArgs

log = logging.getLogger("meshlm")


def start_runtime(args: EngineArgs):
    """Return rank 0's coordinator (or a proxy to it). Other ranks serve steps here, then exit."""
    from meshlm.launcher.world import launched_by_mpi
    num_ranks = args.tensor_parallel_size * args.pipeline_parallel_size
    if launched_by_mpi():
        return start_in_mpi_world(args, num_ranks)
    if num_ranks == 1:
        from meshlm.api.build import build_local_coordinator
        return build_local_coordinator(args)
    from meshlm.api.remote import RemoteCoordinator
    return RemoteCoordinator.launch(args, num_ranks)


def start_in_mpi_world(args: EngineArgs, num_ranks: int):
    from meshlm.launcher.logging import set_rank_description, setup_logging
    from meshlm.launcher import env
    from meshlm.launcher.world import PhaseWatchdog, check_gpus_per_node, init_world
    from meshlm.api.build import RankRuntime
    from meshlm.engine.dispatch import MPIDispatcher
    from meshlm.executor.worker import worker_loop

    world = init_world()
    if world.size != num_ranks:
        raise ValueError(f"the MPI world has {world.size} ranks but tp={args.tensor_parallel_size} x "
                         f"pp={args.pipeline_parallel_size} needs {num_ranks}; start "
                         f"mpiexec -n {num_ranks}")
    check_gpus_per_node(world, args.device)
    mapping = Mapping(world.size, world.rank, args.tensor_parallel_size, args.pipeline_parallel_size,
                      args.moe_expert_parallel_size or 1, gpus_per_node=max(1, world.local_size))
    setup_logging(world.rank, mapping.describe())
    set_rank_description(mapping.describe())
    if world.table:
        log.info("%s started", world.table[world.rank])
    # Communicator set-up and loading are bounded like steps: a rank that hangs there is named.
    phases = PhaseWatchdog(world, env.get_int("MESHLM_SETUP_TIMEOUT_S"))
    runtime = RankRuntime(args, mapping, world.local_rank, world.comm if world.size > 1 else None, phases)
    if world.rank != 0:
        worker_loop(runtime.engine, world)
        sys.exit(0)
    if world.size == 1:
        from meshlm.engine.dispatch import LocalDispatcher
        return runtime.make_coordinator(LocalDispatcher(runtime.engine))
    executor = MPIDispatcher(runtime.engine, world)
    atexit.register(executor.shutdown)
    return runtime.make_coordinator(executor)
