"""Rank-side script of the multi-node tests: where this rank landed, then one greedy generation.

    mpiexec ... python tests/multinode/run_rank.py --model DIR --prompt "w5 w17" --max-tokens 8 \\
        --tp 2 --pp 2 --out result.json

Every rank asks meshlm's launcher for its place (``init_world``: world rank and size, node-local
rank and size from MPI's COMM_TYPE_SHARED split) and prints it with its hostname; rank 0 gathers
them, generates with ``LLM(...)`` over the whole world, and writes ``{"ranks": [{"rank", "size",
"local_rank", "local_size", "host"}], "token_ids", "text"}``.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from meshlm.launcher.world import init_world
    world = init_world()
    place = {"rank": world.rank, "size": world.size, "local_rank": world.local_rank,
             "local_size": world.local_size, "host": socket.gethostname()}
    print(f"[run_rank] {json.dumps(place)}", flush=True)
    places = world.comm.gather(place, root=0)

    from meshlm import LLM, SamplingParams
    llm = LLM(args.model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, device="cpu",
              num_kv_blocks=64, max_model_len=256)  # ranks other than 0 serve steps, then exit here
    try:
        (out,) = llm.generate([args.prompt], SamplingParams(temperature=0, max_tokens=args.max_tokens))
    finally:
        llm.shutdown()
    with open(args.out, "w") as f:
        json.dump({"ranks": places, "token_ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
