"""The cost of sending one step plan from rank 0 to every rank (CPU, MPI), as the workers get it:
meshlm's byte-buffer envelope against a pickled broadcast of the same plan.

    mpiexec -n 8 python benchmarks/plan_broadcast.py --batches 1,64,256,1024 --context 2048

Each row: a decode plan of ``batch`` sequences with ``context`` tokens of KV each (block size 16);
its size on the wire with the whole block table, and as the channel sends it once the ranks hold
the tables (a decode step in which no sequence took a new block: 15 steps of 16); the median time
of ``--repeats`` broadcasts of the latter (encode on rank 0, decode everywhere) and of a pickled
broadcast of the plan.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.protocol import BlockTableMirror, Envelope, MessageKind, StepPlan, encode_envelope  # noqa: E402


def decode_plan(batch: int, context: int, block_size: int = 16) -> StepPlan:
    rng = np.random.default_rng(batch)
    width = context // block_size
    tables = rng.integers(0, 50_000, (batch, width)).astype(np.int32)  # [batch, width]
    positions = np.full(batch, context - 1, dtype=np.int64)
    slots = tables[:, -1].astype(np.int64) * block_size + (context - 1) % block_size
    return StepPlan(rng.integers(0, 128_000, batch).astype(np.int64), positions, slots,
                    np.arange(batch + 1, dtype=np.int32), np.full(batch, context, dtype=np.int32), tables,
                    np.arange(batch, dtype=np.int64), [f"req-{i}" for i in range(batch)],
                    seq_slots=np.arange(batch, dtype=np.int32))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    from mpi4py import MPI

    from meshlm.executor.worker import StepChannel
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256,1024")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=50)
    ns = parser.parse_args()
    comm = MPI.COMM_WORLD
    channel = StepChannel(comm, sampler_rank=0)
    rows = []
    for batch in (int(b) for b in ns.batches.split(",")):
        plan = decode_plan(batch, ns.context) if comm.rank == 0 else None
        envelope = Envelope(MessageKind.STEP, plan) if comm.rank == 0 else None

        def buffers():
            channel.broadcast(envelope)
            comm.Barrier()

        def pickled():
            comm.bcast(envelope, root=0)
            comm.Barrier()

        buffers()  # the ranks now hold these tables
        whole = len(encode_envelope(envelope)) if comm.rank == 0 else 0
        changes = 0
        if comm.rank == 0:  # a mirror holding the tables: what a step sends once the ranks have them
            mirror = BlockTableMirror()
            mirror.encode(plan.seq_slots, plan.block_tables)
            changes = len(encode_envelope(envelope, mirror))
        rows.append((batch, whole, changes, timed(buffers, ns.repeats), timed(pickled, ns.repeats)))
    if comm.rank == 0:
        print(f"{comm.size} ranks, context {ns.context} tokens (block size 16)")
        print(f"{'batch':>6} {'whole table B':>14} {'changes B':>10} {'channel ms':>11} {'pickle ms':>10}")
        for batch, whole, changes, t_buf, t_pickle in rows:
            print(f"{batch:>6} {whole:>14} {changes:>10} {t_buf * 1e3:>11.3f} {t_pickle * 1e3:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
