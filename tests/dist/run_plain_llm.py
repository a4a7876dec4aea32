"""A plain Python process (not under mpiexec) that asks for ``tensor_parallel_size=2``.

    python tests/dist/run_plain_llm.py --model DIR --prompts prompts.json --out out.json --tp 2 \
        [--api AsyncLLM] [--skip-tokenizer-init]

``LLM(...)`` starts mpiexec itself. While the model is up, the script lists every process below
it (mpiexec, its proxy, the ranks), so the test can count the ranks and check, after the exit,
that none of them is left.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from proc_tree import descendants  # beside this script


async def _generate_async(llm, prompts, params):
    async def last(prompt, request_id):
        async for out in llm.generate(prompt, params, request_id=request_id):
            pass
        return out
    try:
        outs = await asyncio.gather(*[last(p, f"r{i}") for i, p in enumerate(prompts)])
        return outs, descendants(os.getpid())
    finally:
        llm.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--api", choices=("LLM", "AsyncLLM"), default="LLM")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    args = parser.parse_args()

    from meshlm import AsyncLLM, LLM, SamplingParams
    prompts = json.loads(Path(args.prompts).read_text())
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    engine = dict(tensor_parallel_size=args.tp, device="cpu", num_kv_blocks=64, max_model_len=512,
                  skip_tokenizer_init=args.skip_tokenizer_init)
    if args.api == "LLM":
        llm = LLM(model=args.model, **engine)
        outs = llm.generate(prompts, params)
        running = descendants(os.getpid())
        llm.shutdown()
    else:
        outs, running = asyncio.run(_generate_async(AsyncLLM(model=args.model, **engine), prompts, params))
    Path(args.out).write_text(json.dumps({
        "pid": os.getpid(),
        "processes_while_running": running,
        "results": [{"token_ids": o.outputs[0].token_ids} for o in outs],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
