"""Rank-side script of the FP8 layout tests: every rank runs it, rank 0 writes the results.

    mpiexec -n 4 python tests/dist/run_fp8_layout.py --spec spec.json --out out.json --tp 4
    mpiexec -n 4 python tests/dist/run_fp8_layout.py --spec spec.json --out out.json --tp 2 --pp 2
    python tests/dist/run_fp8_layout.py --spec spec.json --out ref.json          # the single-rank run

``spec.json`` lists run_layout's jobs; a job with ``"moe": true`` runs with ``moe_ep = tp`` (whole
experts on every rank). Rank 0 writes ``{"world_size", "ranks", "results": {name: [{"token_ids",
"logprobs"}]}}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mpi4py import MPI

from run_layout import run_job  # same folder: the generation part is shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    print(f"[run_layout] rank {rank} of {size} pid {os.getpid()}", flush=True)
    ranks = world.gather(rank, root=0)
    spec = json.loads(open(args.spec).read())
    results = {job["name"]: run_job(job, args.tp, args.pp, args.tp if job.get("moe") else None)
               for job in spec["jobs"]}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": size, "ranks": ranks, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
