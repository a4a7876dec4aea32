"""How rank 0 has a step run: on its own model runner alone, or on every rank of the MPI world.

The coordinator calls ``execute(plan)`` on one of these dispatchers and gets the sampled tokens
back; it does not know how many ranks there are.
"""
from __future__ import annotations

import logging
from typing import Protocol

from meshlm.executor.model_runner import ModelRunner
from meshlm.executor.worker import RESULT_TAG
from meshlm.launcher.world import StepWatchdog, World
from meshlm.protocol import Command, StepPlan
from meshlm.executor.sampler import SamplerOutput

log = logging.getLogger("meshlm")


class StepDispatcher(Protocol):
    def execute(self, plan: StepPlan) -> SamplerOutput | None: ...

    def shutdown(self) -> None: ...


class LocalDispatcher:
    """One rank: the coordinator calls its own engine."""

    def __init__(self, engine: ModelRunner):
        self.engine = engine

    def execute(self, plan):
        return self.engine.execute(plan)

    def shutdown(self):
        self.engine.shutdown()



class MPIDispatcher:
    """Rank 0's side: broadcast each plan, run rank 0's own shard, collect the sampled tokens."""

    def __init__(self, engine: ModelRunner, world: World):
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
                result = self.world.comm.recv(source=self.sampler_rank, tag=RESULT_TAG)
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


