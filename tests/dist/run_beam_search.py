"""Rank-side script: beam search and n > 1 (forked KV blocks) on one world, rank 0 writes JSON.

    mpiexec -n 3 python tests/dist/run_beam_search.py --model DIR --out out.json --tp 3
    python tests/dist/run_beam_search.py --model DIR --out ref.json          # the single-rank run

Every rank prints ``[run_layout] rank R of N pid P`` (the harness's world check); rank 0 writes
``{"ranks", "beams": [[{"tokens", "cum_logprob", "text"}]], "samples": [[token ids]],
"free_blocks", "num_blocks"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mpi4py import MPI

QUESTIONS = ("What is the capital of France?", "Say hello.")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    print(f"[run_layout] rank {world.Get_rank()} of {world.Get_size()} pid {os.getpid()}", flush=True)
    ranks = world.gather(world.Get_rank(), root=0)
    from meshlm import LLM, BeamSearchParams, SamplingParams
    try:
        llm = LLM(model=args.model, tensor_parallel_size=args.tp, device="cpu", num_kv_blocks=96,
                  max_model_len=256, block_size=16)
    except SystemExit as exc:  # ranks other than 0 serve steps inside LLM(...), then exit
        return exc.code or 0
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    beams = llm.beam_search(prompts, BeamSearchParams(beam_width=4, max_tokens=12))
    samples = llm.generate(prompts, SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=8, ignore_eos=True))
    core = llm.engine_core
    free_blocks, num_blocks = core.kv.num_free_blocks, core.num_kv_blocks
    llm.shutdown()
    with open(args.out, "w") as f:
        json.dump({"ranks": ranks, "free_blocks": free_blocks, "num_blocks": num_blocks,
                   "beams": [[{"tokens": s.tokens, "cum_logprob": s.cum_logprob, "text": s.text}
                              for s in o.sequences] for o in beams],
                   "samples": [[c.token_ids for c in o.outputs] for o in samples]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
