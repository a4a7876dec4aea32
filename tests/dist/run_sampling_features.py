"""Rank-side script: the sampling features through ``AsyncLLM`` on the world it runs in.

    mpiexec -n 3 python tests/dist/run_sampling_features.py --model DIR --out out.json --tp 3 [--pp 1]
    python tests/dist/run_sampling_features.py --model DIR --out ref.json               # one rank

Every rank prints ``[run_layout] rank R of N pid P`` and builds ``AsyncLLM`` (the other ranks serve
steps inside it and exit when rank 0 shuts down). Rank 0 runs the requests of ``REQUESTS``
concurrently and writes ``{name: {"token_ids", "logprobs", "prompt_logprobs"}}`` (logprob dicts
as lists of pairs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from mpi4py import MPI

PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the green forest."
GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
# Token ids of the default model's vocabulary (49152): " the", " a", "," and "." and the like.
REQUESTS = {
    "plain": dict(GREEDY),
    "logit_bias": dict(GREEDY, logit_bias={"260": 8.0, "253": -100.0}),
    "allowed_token_ids": dict(GREEDY, allowed_token_ids=[28, 30, 253, 260, 314, 341]),
    "bad_words": dict(GREEDY, bad_words=["The", "forest"]),
    "prompt_logprobs": dict(GREEDY, prompt_logprobs=4),
}


def _pairs(entries):
    return None if entries is None else [None if e is None else list(e.items()) for e in entries]


async def _run(llm) -> dict:
    from meshlm import SamplingParams

    async def one(name: str, fields: dict) -> tuple[str, dict]:
        out = None
        async for out in llm.generate(PROMPT, SamplingParams(**fields), request_id=name):
            pass
        sample = out.outputs[0]
        return name, {"token_ids": sample.token_ids, "logprobs": _pairs(sample.logprobs),
                      "prompt_logprobs": _pairs(out.prompt_logprobs), "prompt_token_ids": out.prompt_token_ids}

    return dict(await asyncio.gather(*[one(name, fields) for name, fields in REQUESTS.items()]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    print(f"[run_layout] rank {comm.Get_rank()} of {comm.Get_size()} pid {os.getpid()}", flush=True)
    from meshlm import AsyncLLM
    # max_num_tokens 16: the prompt is prefilled in chunks, and the requests share steps.
    llm = AsyncLLM(model=args.model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, device="cpu", num_kv_blocks=128,
                   max_model_len=256, max_num_tokens=16, block_size=16)
    try:
        results = asyncio.run(_run(llm))
    finally:
        llm.shutdown()
    Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
