"""NCCL all-reduce through CuPy on torch's stream, for one decoder layer's payload
([batch, hidden] bf16), timed with CUDA events.

    mpirun -n 2 python3 benchmarks/nccl_allreduce.py --hidden 4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--iters", type=int, default=200)
    ns = parser.parse_args()
    from meshlm.launcher.world import init_world
    from meshlm.parallel.comm import NcclComm
    world = init_world()
    torch.cuda.set_device(world.local_rank)
    comm = NcclComm(world.comm.Dup(), list(range(world.size)), torch.device("cuda", world.local_rank))
    for batch in (int(b) for b in ns.batches.split(",")):
        x = torch.ones(batch, ns.hidden, dtype=torch.bfloat16, device="cuda")
        for _ in range(20):
            comm.all_reduce(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ns.iters):
            comm.all_reduce(x)
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1e3 / ns.iters
        if world.rank == 0:
            size = x.numel() * x.element_size()
            print(f"all-reduce {world.size} GPUs, [{batch}, {ns.hidden}] bf16 ({size / 1024:.0f} KiB): "
                  f"{us:.1f} us per call; x 2 per layer")
    comm.destroy()
    world.comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
