"""Every rank but 0: execute the step plans rank 0 broadcasts until told to stop.

Control travels over MPI.COMM_WORLD as flat byte buffers (meshlm.protocol's wire format): rank 0
broadcasts one Envelope per step and the sampling rank sends the StepResult back. Tensors between
ranks travel through the ParallelGroups' communicators inside ``ModelRunner.execute``.
"""
from __future__ import annotations

import logging

import numpy as np

from meshlm.executor.model_runner import ModelRunner
from meshlm.launcher.world import StepWatchdog, World
from meshlm.protocol import (BlockTableMirror, Envelope, MessageKind, StepResult, decode_envelope, decode_result,
                             encode_envelope, encode_result, returns_tokens)

log = logging.getLogger("meshlm")

_RESULT_TAG = 11  # MPI tag of the StepResult the sampling rank sends to rank 0


class StepChannel:
    """The control plane of one MPI world: rank 0's envelopes to all, the sampling rank's result
    back to rank 0. Every call blocks until its message has arrived (or left, for a send)."""

    def __init__(self, comm, sampler_rank: int):
        self.comm = comm
        self.sampler_rank = sampler_rank
        # Rank 0 sends each step's block tables as changes from this copy; the others rebuild them.
        self.tables = BlockTableMirror()

    def broadcast(self, envelope: Envelope | None) -> Envelope:
        """Collective: rank 0 passes the envelope, every other rank passes None and gets it back."""
        from mpi4py import MPI
        buffer = encode_envelope(envelope, self.tables) if self.comm.rank == 0 else None
        size = np.array([0 if buffer is None else len(buffer)], dtype=np.int64)
        self.comm.Bcast([size, MPI.INT64_T], root=0)
        if buffer is None:
            buffer = np.empty(int(size[0]), dtype=np.uint8)
        self.comm.Bcast([buffer, MPI.BYTE], root=0)
        return envelope if self.comm.rank == 0 else decode_envelope(buffer, self.tables)

    def send_result(self, result: StepResult) -> None:
        """The sampling rank (not rank 0): hand the step's tokens to rank 0."""
        from mpi4py import MPI
        buffer = encode_result(result)
        self.comm.Send([np.array([len(buffer)], dtype=np.int64), MPI.INT64_T], dest=0, tag=_RESULT_TAG)
        self.comm.Send([buffer, MPI.BYTE], dest=0, tag=_RESULT_TAG)

    def recv_result(self) -> StepResult:
        """Rank 0: the step's tokens from the sampling rank."""
        from mpi4py import MPI
        size = np.empty(1, dtype=np.int64)
        self.comm.Recv([size, MPI.INT64_T], source=self.sampler_rank, tag=_RESULT_TAG)
        buffer = np.empty(int(size[0]), dtype=np.uint8)
        self.comm.Recv([buffer, MPI.BYTE], source=self.sampler_rank, tag=_RESULT_TAG)
        return decode_result(buffer)


def worker_loop(runner: ModelRunner, world: World) -> None:
    """Every rank but 0: execute the broadcast steps until SHUTDOWN. Returns after a clean shutdown."""
    watchdog = StepWatchdog(world)
    channel = StepChannel(world.comm, runner.mapping.sampler_rank)
    sends_result = runner.is_sampler and world.rank != 0
    while True:
        envelope = channel.broadcast(None)  # idle here between requests: no timeout
        if envelope.kind == MessageKind.SHUTDOWN:
            break
        watchdog.begin()
        pending = runner.execute(envelope.plan)
        if sends_result and returns_tokens(envelope.plan):
            channel.send_result(pending.get_result())  # pipeline stages: the plain loop, no overlap
        watchdog.end()
    runner.shutdown()
    world.comm.Barrier()
