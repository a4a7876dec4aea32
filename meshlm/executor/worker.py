"""The worker loop of every rank but 0: execute the step plans rank 0 broadcasts until told to stop.

Control travels over MPI.COMM_WORLD; tensors between ranks travel through the ParallelGroups'
communicators inside ``ModelRunner.execute``.
"""
from __future__ import annotations

import logging

from meshlm.launcher.world import StepWatchdog, World
from meshlm.executor.model_runner import ModelRunner
from meshlm.protocol import Command

log = logging.getLogger("meshlm")

RESULT_TAG = 11  # MPI tag of the sampled tokens the sampler rank sends to rank 0


def worker_loop(engine: ModelRunner, world: World) -> None:
    """Every rank but 0: execute the broadcast steps until SHUTDOWN. Returns after a clean shutdown."""
    watchdog = StepWatchdog(world)
    sends_result = engine.is_sampler and world.rank != 0
    while True:
        command, payload = world.comm.bcast(None, root=0)  # idle here between requests: no timeout
        if command == Command.SHUTDOWN:
            break
        if command == Command.ABORT_JOB:
            raise RuntimeError(f"rank 0 ended the job: {payload}")
        watchdog.begin()
        result = engine.execute(payload)
        if sends_result and payload.num_tokens and len(payload.sample_rows):
            world.comm.send(result, dest=0, tag=RESULT_TAG)
        watchdog.end()
    engine.shutdown()
    world.comm.Barrier()
