"""Rank-side script of the shutdown test: ``meshlm serve`` whose prefill steps take a while.

    mpiexec -n 2 python tests/dist/run_slow_server.py SECONDS serve --tp 2 --model DIR --port 0

Every rank sleeps SECONDS inside each step that carries more than one token per sequence (a
prefill), printing ``[run_slow_server rank R] prefill step begun`` and ``... ended``, so that the
test can signal the job while a step is running. Test-only: meshlm has no such switch.
"""
from __future__ import annotations

import sys
import time


def main() -> int:
    seconds, argv = float(sys.argv[1]), sys.argv[2:]
    from mpi4py import MPI
    from meshlm.cli import main as meshlm_main
    from meshlm.executor.model_runner import ModelRunner
    rank = MPI.COMM_WORLD.Get_rank()
    original = ModelRunner.execute

    def execute(self, plan):
        if plan.num_tokens <= 8:  # decode steps of the test's single request
            return original(self, plan)
        print(f"[run_slow_server rank {rank}] prefill step begun", flush=True)
        time.sleep(seconds)
        result = original(self, plan)
        print(f"[run_slow_server rank {rank}] prefill step ended", flush=True)
        return result

    ModelRunner.execute = execute
    return meshlm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
