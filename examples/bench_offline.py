"""Offline throughput and latency of the default model at a few concurrency limits, from Python.

    python examples/bench_offline.py                      (one rank: CPU, or one GPU)
    mpiexec -n 3 python examples/bench_offline.py --tp 3  (three ranks; rank 0 prints)

The same as `meshlm bench throughput --sweep-concurrency 1,4,inf ...` on the command line.
"""
from __future__ import annotations

import argparse

from meshlm.bench.dataset import Workload
from meshlm.bench.throughput import ThroughputOptions, run_throughput
from meshlm.config import EngineArgs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--num-prompts", type=int, default=16)
    ns = parser.parse_args()
    args = EngineArgs(tensor_parallel_size=ns.tp, max_model_len=512)
    workload = Workload(num_prompts=ns.num_prompts, input_len=64, output_len=16, input_stdev=16, warmup=2)
    opts = ThroughputOptions(workload, sweep_concurrency=[1, 4, None], show_progress=False)
    result = run_throughput(args, opts)  # prints the table; only rank 0 gets here
    for point in result["sweep"]:
        print(f"concurrency {point['max_concurrency'] or 'inf':>4}: {point['output_throughput']:8.1f} "
              f"output tok/s, TPOT p50 {point['tpot_ms']['p50']:.1f} ms")


if __name__ == "__main__":
    main()
