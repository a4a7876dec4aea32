"""Start the runtime for this process: one rank here, ranks of the MPI world we are in, or a
new MPI world started from this plain process."""
from __future__ import annotations

import atexit
import logging
import sys

from meshlm.parallel.mapping import Mapping
from meshlm.config import EngineArgs, EngineConfig

log = logging.getLogger("meshlm")


def start_runtime(args: EngineArgs):
    """Return rank 0's coordinator (or a proxy to it). Other ranks serve steps here, then exit."""
    from meshlm.launcher.world import launched_by_mpi
    config = EngineConfig.from_args(args)  # resolves the model and checks the layout, before any rank starts
    if launched_by_mpi():
        return start_in_mpi_world(config)
    if config.parallel.world_size == 1:
        from meshlm.api.build import RankRuntime
        from meshlm.engine.dispatch import LocalDispatcher
        runtime = RankRuntime(config, Mapping())
        return runtime.make_coordinator(LocalDispatcher(runtime.runner))
    from meshlm.api.remote import RemoteCoordinator
    return RemoteCoordinator.launch(args, config)


def start_in_mpi_world(config: EngineConfig):
    from meshlm.api.build import RankRuntime
    from meshlm.engine.dispatch import LocalDispatcher, MPIDispatcher
    from meshlm.executor.worker import worker_loop
    from meshlm.launcher.logging import set_rank_description, setup_logging
    from meshlm.launcher import env
    from meshlm.launcher.world import PhaseWatchdog, check_gpus_per_node, init_world

    world = init_world()
    parallel = config.parallel
    if world.size != parallel.world_size:
        raise ValueError(f"the MPI world has {world.size} ranks but tp={parallel.tensor_parallel_size} x "
                         f"pp={parallel.pipeline_parallel_size} needs {parallel.world_size}; start "
                         f"mpiexec -n {parallel.world_size}")
    check_gpus_per_node(world, config.device)
    mapping = Mapping(world.size, world.rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                      parallel.moe_expert_parallel_size or 1, gpus_per_node=max(1, world.local_size))
    setup_logging(world.rank, mapping.describe())
    set_rank_description(mapping.describe())
    if world.table:
        log.info("%s started", world.table[world.rank])
    # Communicator set-up and loading are bounded like steps: a rank that hangs there is named.
    phases = PhaseWatchdog(world, env.get_int("MESHLM_SETUP_TIMEOUT_S"))
    runtime = RankRuntime(config, mapping, world.local_rank, world.comm if world.size > 1 else None, phases)
    if world.rank != 0:
        worker_loop(runtime.runner, world)
        sys.exit(0)
    if world.size == 1:
        return runtime.make_coordinator(LocalDispatcher(runtime.runner))
    dispatcher = MPIDispatcher(runtime.runner, world)
    atexit.register(dispatcher.shutdown)
    return runtime.make_coordinator(dispatcher)
