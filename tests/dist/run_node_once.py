"""Rank-side script: one rank per node resolves, the node's other ranks take its answer.

    mpiexec -n 2 python tests/dist/run_node_once.py --model org/absent

Every rank prints ``[run_layout] rank R of N pid P``, then ``[node_once] rank R got (r, pid)``:
the world rank and pid of the process that ran the work for its node; then
``[node_once] rank R resolved PATH`` or ``[node_once] rank R error: MESSAGE`` for ``--model``
(resolved with the hub cache and offline mode of its environment).
"""
from __future__ import annotations

import argparse
import os
import sys

from mpi4py import MPI


def say(line: str) -> None:
    """One write per line, so that the lines of two ranks do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--revision", default=None)
    args = parser.parse_args()
    from meshlm.launcher.world import init_world, once_per_node
    from meshlm.weights.resolve import resolve_model_on_ranks
    world = init_world()
    rank = MPI.COMM_WORLD.Get_rank()
    say(f"[run_layout] rank {rank} of {MPI.COMM_WORLD.Get_size()} pid {os.getpid()}")
    worker = once_per_node(world, lambda: (world.rank, os.getpid()))
    say(f"[node_once] rank {rank} got {tuple(worker)}")
    try:
        path = resolve_model_on_ranks(args.model, args.revision)
        say(f"[node_once] rank {rank} resolved {path}")
    except FileNotFoundError as exc:
        say(f"[node_once] rank {rank} error: {exc}")
    MPI.COMM_WORLD.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
