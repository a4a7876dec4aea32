"""Rank 0 drives the other ranks over MPI; the other ranks execute steps until told to stop.

Control travels over MPI.COMM_WORLD (a pickled Command and payload per step); tensors between
ranks travel through the ParallelGroups' communicators inside ``Engine.execute``.
"""
from __future__ import annotations

import logging

from meshlm.launcher.world import StepWatchdog, World
from meshlm.runtime.engine import Engine
from meshlm.runtime.protocol import Command, StepPlan
from meshlm.runtime.sampler import SamplerOutput

log = logging.getLogger("meshlm")

_RESULT_TAG = 11


class MPIExecutor:
    """Rank 0's side: broadcast each plan, run rank 0's own shard, collect the sampled tokens."""

    def __init__(self, engine: Engine, world: World):
        self.engine = engine
        self.world = world
        self.sampler_rank = engine.mapping.sampler_rank
        self.watchdog = StepWatchdog(world)
        self._closed = False

    def execute(self, plan: StepPlan) -> SamplerOutput | None:
        """Blocks until every rank has run the step and the sampler rank's tokens arrived."""
        self.watchdog.begin()
        try:
            self.world.comm.bcast((Command.STEP, plan), root=0)
            result = self.engine.execute(plan)
            if self.sampler_rank != 0 and plan.num_tokens and len(plan.sample_rows):
                result = self.world.comm.recv(source=self.sampler_rank, tag=_RESULT_TAG)
            return result
        finally:
            self.watchdog.end()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.world.comm.bcast((Command.SHUTDOWN, None), root=0)
        self.engine.shutdown()
        self.world.comm.Barrier()


def worker_loop(engine: Engine, world: World) -> None:
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
            world.comm.send(result, dest=0, tag=_RESULT_TAG)
        watchdog.end()
    engine.shutdown()
    world.comm.Barrier()
