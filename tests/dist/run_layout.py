"""Rank-side script of the distributed tests: every rank runs it, rank 0 writes the results.

    mpiexec -n 4 python tests/dist/run_layout.py --spec spec.json --out out.json --tp 2 --pp 2
    python tests/dist/run_layout.py --spec spec.json --out ref.json            # the single-rank run

``spec.json`` lists jobs ``{"name", "model", "prompts", "chat", "max_tokens", "logprobs",
"ignore_eos"}``, and optionally the engine's ``num_kv_blocks``, ``block_size``, ``max_model_len``,
``max_num_tokens``, ``async_scheduling``, ``kv_cache_dtype``, ``quantization``, ``speculative_config``,
``device`` (cpu unless given), ``dtype`` and ``enable_cuda_graphs``, and the
sampling's ``temperature`` and ``seed`` (greedy unless given), and ``structured_outputs`` (one dict per prompt): a
prompt is a list of token ids, or a user message when ``chat`` is true. Each
job is one ``LLM(...)`` over the whole world. Every rank prints ``[run_layout] rank R of
N pid P``; rank 0 writes ``{"world_size", "ranks", "results": {name: [{"token_ids",
"logprobs"}]}}``, where ``ranks`` lists the ranks that answered a gather over the world, so the
test can tell a real N-rank world from N singletons.

Fault injection (for the failure tests, never in meshlm): ``--fault kill|raise|stall|stop``,
``--fault-rank R``, ``--fault-step S`` make rank R SIGKILL itself, raise, sleep or SIGSTOP itself
inside its S-th ``ModelRunner.execute``; ``--fault stall-loading`` makes rank R sleep while it
builds its ModelRunner (weight loading).

``--warm-up`` has every rank run the start-up's synthetic mixed steps (executor/warmup.py, on a GPU
only otherwise) and adds ``"warm_ups"``: per rank, the steps each of its engines ran.

``--ep`` sets ``moe_expert_parallel_size``. ``--report-runners`` adds ``"runners"`` to the file:
per rank, per job, the device its ModelRunner got, the class of its TP and PP communicators and
the decode CUDA graph replays it ran (the GPU tests check NCCL, ``cuda:<local rank>`` and graphs).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from mpi4py import MPI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=None)
    parser.add_argument("--report-runners", action="store_true")
    parser.add_argument("--warm-up", action="store_true")
    parser.add_argument("--fault", choices=("kill", "raise", "stall", "stop", "stall-loading"), default=None)
    parser.add_argument("--fault-rank", type=int, default=1)
    parser.add_argument("--fault-step", type=int, default=3)
    return parser.parse_args(argv)


def install_fault(kind: str, step: int) -> None:
    """Make this rank fail inside its ``step``-th ModelRunner.execute (counted from 1)."""
    from meshlm.executor.model_runner import ModelRunner
    if kind == "stall-loading":
        loading = ModelRunner.__init__

        def stalled_init(self, *args, **kwargs):
            print(f"[run_layout rank {MPI.COMM_WORLD.Get_rank()}] injecting {kind}", flush=True)
            time.sleep(600)  # only the watchdog ends this
            loading(self, *args, **kwargs)

        ModelRunner.__init__ = stalled_init
        return
    original = ModelRunner.execute
    calls = {"n": 0}

    def execute(self, plan):
        calls["n"] += 1
        if calls["n"] == step:
            print(f"[run_layout rank {MPI.COMM_WORLD.Get_rank()}] injecting {kind} at step {step}",
                  flush=True)
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "raise":
                raise RuntimeError(f"injected failure at step {step}")
            if kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(600)  # stall: only the watchdog ends this
        return original(self, plan)

    ModelRunner.execute = execute


def record_runners(records: list[dict]) -> None:
    """Append one entry per ModelRunner this rank builds: its device, communicators and, once it
    shuts down, how many decode CUDA graph replays it ran."""
    from meshlm.executor.model_runner import ModelRunner
    building, shutting_down = ModelRunner.__init__, ModelRunner.shutdown

    def init(self, config, groups, device, *args, **kwargs):
        records.append({"device": str(device), "tp_comm": type(groups.tp).__name__,
                        "pp_comm": type(groups.pp).__name__, "graph_replays": None})
        building(self, config, groups, device, *args, **kwargs)

    def shutdown(self):
        if records and records[-1]["graph_replays"] is None:
            graphs = self.graph_runner
            records[-1]["graph_replays"] = 0 if graphs is None else graphs.num_replays
        shutting_down(self)

    ModelRunner.__init__, ModelRunner.shutdown = init, shutdown


def force_warm_up(counts: list[int]) -> None:
    """Every engine built from now on runs the start-up's mixed steps; ``counts`` gets how many."""
    from meshlm.executor.model_runner import ModelRunner
    warm_up = ModelRunner.warm_up_mixed_steps

    def counted(self, *args):
        counts.append(warm_up(self, *args))
        return counts[-1]

    ModelRunner.compiles_kernels_on_first_use = lambda self: True
    ModelRunner.warm_up_mixed_steps = counted


def run_job(job: dict, tp: int, pp: int, ep: int | None = None) -> list[dict] | None:
    """Generate for one job; rank 0 returns per-prompt results, other ranks None."""
    from meshlm import LLM, SamplingParams
    params = SamplingParams(temperature=job.get("temperature", 0.0), seed=job.get("seed"),
                            max_tokens=job["max_tokens"], logprobs=job.get("logprobs"),
                            ignore_eos=job.get("ignore_eos", True))
    try:
        llm = LLM(model=job["model"], tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  moe_expert_parallel_size=ep, device=job.get("device", "cpu"), dtype=job.get("dtype", "auto"),
                  enable_cuda_graphs=job.get("enable_cuda_graphs", True), num_kv_blocks=job.get("num_kv_blocks", 64),
                  max_model_len=job.get("max_model_len", 512),
                  max_num_tokens=job.get("max_num_tokens", 8192),
                  async_scheduling=job.get("async_scheduling", True), block_size=job.get("block_size", 16),
                  kv_cache_dtype=job.get("kv_cache_dtype", "auto"), speculative_config=job.get("speculative_config"),
                  quantization=job.get("quantization"), hf_overrides=job.get("hf_overrides"))
    except SystemExit as exc:
        # Ranks other than 0 serve steps inside LLM(...) and then sys.exit(0). Catching it here
        # lets one world run several jobs; MPI stays initialised until the process ends.
        if exc.code not in (0, None):
            raise
        return None
    if job.get("structured_outputs"):
        params = [params.replace(structured_outputs=spec) for spec in job["structured_outputs"]]
    try:
        if job.get("chat"):
            outs = llm.chat([[{"role": "user", "content": p}] for p in job["prompts"]], params)
        else:
            outs = llm.generate([list(p) for p in job["prompts"]], params)
    finally:
        llm.shutdown()
    return [{"token_ids": o.outputs[0].token_ids,
             "logprobs": [{str(t): lp for t, lp in step.items()} for step in (o.outputs[0].logprobs or [])]}
            for o in outs]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    print(f"[run_layout] rank {rank} of {size} pid {os.getpid()}", flush=True)
    ranks = world.gather(rank, root=0)
    if args.fault and rank == args.fault_rank:
        install_fault(args.fault, args.fault_step)
    runners: list[dict] = []
    if args.report_runners:
        record_runners(runners)
    warm_ups: list[int] = []
    if args.warm_up:
        force_warm_up(warm_ups)
    with open(args.spec) as f:
        spec = json.load(f)
    results = {}
    for job in spec["jobs"]:
        results[job["name"]] = run_job(job, args.tp, args.pp, args.ep)
    every_rank_runners = world.gather(runners, root=0) if args.report_runners else None
    every_rank_warm_ups = world.gather(warm_ups, root=0) if args.warm_up else None
    if rank == 0:
        out = {"world_size": size, "ranks": ranks, "results": results}
        if args.report_runners:
            out["runners"] = every_rank_runners
        if args.warm_up:
            out["warm_ups"] = every_rank_warm_ups
        with open(args.out, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
