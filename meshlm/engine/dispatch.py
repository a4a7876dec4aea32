"""How rank 0 has a step run: on its own model runner alone, or on every rank of the MPI world.

The coordinator calls ``execute(plan)`` on a StepDispatcher and gets the sampled tokens back; it
does not know how many ranks there are.
"""
from __future__ import annotations

from typing import Protocol

from meshlm.executor.async_output import AsyncStepResult
from meshlm.executor.model_runner import ModelRunner
from meshlm.executor.worker import StepChannel
from meshlm.launcher.world import StepWatchdog, World
from meshlm.protocol import Envelope, MessageKind, StepPlan, returns_tokens


class StepDispatcher(Protocol):
    def execute(self, plan: StepPlan) -> AsyncStepResult | None:
        """Launch the step on every rank; the sampled tokens on their way to rank 0 when the plan
        samples, else None."""

    def shutdown(self) -> None:
        """Stop every rank; later calls do nothing."""


class LocalDispatcher:
    """One rank: the coordinator's own model runner runs the step."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, plan: StepPlan) -> AsyncStepResult | None:
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        self.runner.shutdown()


class MPIDispatcher:
    """Rank 0 of several: broadcast each plan, run rank 0's own shard, collect the sampled tokens."""

    def __init__(self, runner: ModelRunner, world: World):
        self.runner = runner
        self.world = world
        self.channel = StepChannel(world.comm, runner.mapping.sampler_rank)
        self.watchdog = StepWatchdog(world)
        self._closed = False

    def execute(self, plan: StepPlan) -> AsyncStepResult | None:
        """Broadcast the plan and launch rank 0's shard. When another rank samples (pipeline
        stages), blocks until its tokens arrived; else they come through rank 0's own copy."""
        self.watchdog.begin()
        try:
            self.channel.broadcast(Envelope(MessageKind.STEP, plan))
            pending = self.runner.execute(plan)
            if self.channel.sampler_rank != 0 and returns_tokens(plan):
                pending = AsyncStepResult(ready=self.channel.recv_result())
            return pending
        finally:
            self.watchdog.end()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.channel.broadcast(Envelope(MessageKind.SHUTDOWN))
        self.runner.shutdown()
        self.world.comm.Barrier()
