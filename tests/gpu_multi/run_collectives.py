"""Rank-side script of the NCCL tests: every rank runs it, rank 0 writes the file.

    mpiexec -n 4 python tests/gpu_multi/run_collectives.py --out out.json

Every rank prints ``[run_layout] rank R of N pid P`` (the harness checks the world from these),
takes its GPU as the engine does (``pick_device`` with the node-local rank) and reports it. Then,
for each layout (tp=N; pp=N; tp=2 x pp=N/2 when N >= 4), it builds its ParallelGroups twice over
the same Mapping, NCCL on its GPU and MPI on the CPU, runs the named collectives on the same
tensors through both, and measures the largest difference. The groups are destroyed before the
end, so the process exits by itself. Rank 0 writes ``{"world_size", "ranks", "devices": [per
rank], "checks": [every rank's checks]}`` (a check as agreement.collective_failures reads it).

``--device cpu`` runs the same script with MPI on both sides (the CPU test of its bookkeeping:
which results are paired, shapes, the None of non-sampler ranks, the pipeline chain).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from mpi4py import MPI

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def sample(kind: str, shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    """The same CPU tensor for both backends: normal floats, small integers, or token ids."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=gen).to(DTYPES[dtype])
    # Integers below 16: a sum over up to 16 ranks stays below 256, exact in bf16 whatever the order
    return torch.randint(0, 16, shape, generator=gen).to(DTYPES[dtype])


def difference(nccl: torch.Tensor | None, mpi: torch.Tensor | None) -> dict:
    """Shapes (None for a None result) and the largest absolute difference, in float64."""
    if nccl is None or mpi is None or nccl.shape != mpi.shape:
        return {"nccl_shape": None if nccl is None else list(nccl.shape),
                "mpi_shape": None if mpi is None else list(mpi.shape), "max_abs_diff": None}
    diff = (nccl.cpu().double() - mpi.double()).abs()
    return {"nccl_shape": list(nccl.shape), "mpi_shape": list(mpi.shape),
            "max_abs_diff": float(diff.max()) if diff.numel() else 0.0}


def device_report(world, device: torch.device) -> dict:
    report = {"rank": world.rank, "local_rank": world.local_rank, "device": str(device), "pid": os.getpid()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report.update(current_device=torch.cuda.current_device(), uuid=str(props.uuid), name=props.name)
    return report


def tp_cases(groups, rank: int) -> list[tuple[str, str, object]]:
    """(name, dtype, fn(tensor factory) -> result) of the TP-group collectives."""
    tp_rank = groups.tp.rank
    cases = []
    for dtype, kind in (("float32", "normal"), ("bfloat16", "integer"), ("int64", "integer")):
        cases.append(("all_reduce_tp", dtype, lambda make, d=dtype, k=kind: groups.tp.all_reduce(
            make(k, (33, 64), d, 100 + rank))))  # [num_tokens, hidden]
    cases.append(("combine_from_experts", "bfloat16", lambda make: groups.combine_from_experts(
        make("integer", (7, 64), "bfloat16", 200 + rank))))
    cases.append(("gather_logits_to_sampler", "float32", lambda make: groups.gather_logits_to_sampler(
        make("normal", (5, 40), "float32", 300 + rank))))  # [num_rows, vocab_per_rank]
    cases.append(("all_gather_dim0", "bfloat16", lambda make: groups.tp.all_gather(
        make("normal", (3, 16), "bfloat16", 400 + rank), dim=0)))
    cases.append(("broadcast_sampled_tokens", "int64", lambda make: groups.broadcast_sampled_tokens(
        make("integer", (9,), "int64", 500 if tp_rank == 0 else 600 + rank))))
    last = groups.tp.size - 1
    cases.append(("broadcast_from_last", "float32", lambda make: groups.tp.broadcast(
        make("normal", (4, 8), "float32", 700 if tp_rank == last else 800 + rank), last)))
    return cases


def pp_cases(groups, rank: int) -> list[tuple[str, str, object]]:
    """send_to_next_stage / recv_from_prev_stage along the pipeline, one dtype at a time: every
    stage but the first receives, then every stage but the last sends what it was sent plus one."""
    def hand_off(make, dtype):
        stage, stages = groups.pp.rank, groups.pp.size
        hidden = make("normal", (6, 32), dtype, 900)  # [num_tokens, hidden]; stage 0's input
        if stage > 0:
            hidden = groups.recv_from_prev_stage(tuple(hidden.shape), hidden.dtype, hidden.device)
        if stage < stages - 1:
            groups.send_to_next_stage(hidden + 1)
        return hidden
    return [("pipeline_hand_off", dtype, lambda make, d=dtype: hand_off(make, d))
            for dtype in ("float32", "bfloat16")]


def run_layout(tp: int, pp: int, device: torch.device) -> list[dict]:
    """Both backends' groups for tp x pp (on a CPU ``device``, MPI twice), every case through both,
    the differences."""
    from meshlm.parallel.groups import ParallelGroups
    from meshlm.parallel.mapping import Mapping
    world = MPI.COMM_WORLD
    mapping = Mapping(world.Get_size(), world.Get_rank(), tp, pp)
    nccl = ParallelGroups.from_mpi(mapping, device)
    mpi = ParallelGroups.from_mpi(mapping, torch.device("cpu"))
    on_gpu = lambda *a: sample(*a).to(device)  # noqa: E731
    checks = []
    cases = (tp_cases(nccl, mapping.rank) if tp > 1 else []) + (pp_cases(nccl, mapping.rank) if pp > 1 else [])
    mpi_cases = (tp_cases(mpi, mapping.rank) if tp > 1 else []) + (pp_cases(mpi, mapping.rank) if pp > 1 else [])
    for (name, dtype, run_nccl), (_, _, run_mpi) in zip(cases, mpi_cases):
        got = run_nccl(on_gpu)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        want = run_mpi(sample)
        checks.append({"layout": f"tp{tp}-pp{pp}", "name": name, "rank": mapping.rank, "dtype": dtype,
                       **difference(got, want)})
    nccl.destroy()
    mpi.destroy()
    return checks


def layouts(size: int) -> list[tuple[int, int]]:
    out = [(size, 1), (1, size)]
    if size >= 4 and size % 2 == 0:
        out.append((2, size // 2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args(argv)
    from meshlm.api.build import pick_device
    from meshlm.launcher.world import init_world
    world = init_world()
    say(f"[run_layout] rank {world.rank} of {world.size} pid {os.getpid()}")
    ranks = world.comm.gather(world.rank, root=0)
    device = pick_device(args.device, world.local_rank)
    devices = world.comm.gather(device_report(world, device), root=0)
    checks = [c for tp, pp in layouts(world.size) for c in run_layout(tp, pp, device)]
    every_check = world.comm.gather(checks, root=0)
    if world.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world.size, "ranks": ranks, "devices": devices,
                       "checks": [c for rank_checks in every_check for c in rank_checks]}, f)
    world.comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
