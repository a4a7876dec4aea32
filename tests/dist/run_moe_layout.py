"""Rank-side script of the MoE layout tests: every rank runs it, rank 0 writes the results.

    mpiexec -n 4 python tests/dist/run_moe_layout.py --spec spec.json --out out.json --tp 4 --ep 2
    python tests/dist/run_moe_layout.py --spec spec.json --out ref.json           # the single-rank run

``spec.json`` lists jobs ``{"name", "model", "prompts", "max_tokens", "logprobs"}`` (prompts as token
ids); each is one ``LLM(...)`` over the whole world with ``moe_expert_parallel_size=--ep``. Before
the jobs, every rank builds its ParallelGroups and sums its global rank over the ``ep`` and
``moe_tp`` communicators. Rank 0 writes ``{"world_size", "ranks", "groups": [per rank: {"ep",
"moe_tp", "ep_sum", "moe_tp_sum"}], "results": {name: [{"token_ids", "logprobs"}]}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mpi4py import MPI

from run_layout import run_job  # same folder: the generation part is shared


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=None)
    return parser.parse_args(argv)


def check_moe_groups(tp: int, pp: int, ep: int | None) -> dict:
    """This rank's ep and moe_tp groups as its Mapping computes them, and the sum of the global ranks
    over an MPI communicator split by them (every member must name the same group)."""
    from meshlm.parallel.mapping import Mapping
    world = MPI.COMM_WORLD
    mapping = Mapping(world.Get_size(), world.Get_rank(), tp, pp, ep or 1)
    sums = {}
    for name, members in (("ep", mapping.moe_ep_group), ("moe_tp", mapping.moe_tp_group)):
        sub = world.Split(color=members[0], key=mapping.rank)
        sums[name] = members
        sums[f"{name}_sum"] = sub.allreduce(mapping.rank)
        sub.Free()
    return sums


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    print(f"[run_layout] rank {rank} of {size} pid {os.getpid()}", flush=True)
    ranks = world.gather(rank, root=0)
    groups = world.gather(check_moe_groups(args.tp, args.pp, args.ep) if size > 1 else None, root=0)
    spec = json.loads(open(args.spec).read())
    results = {job["name"]: run_job(job, args.tp, args.pp, args.ep) for job in spec["jobs"]}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": size, "ranks": ranks, "groups": groups, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
