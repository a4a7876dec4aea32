"""A plain Python process (not under mpiexec) that asks for ``tensor_parallel_size=2``.

    python tests/dist/run_plain_llm.py --model DIR --prompts prompts.json --out out.json --tp 2

``LLM(...)`` starts mpiexec itself. While the model is up, the script lists every process below
it (mpiexec, its proxy, the ranks), so the test can count the ranks and check, after the exit,
that none of them is left.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from proc_tree import descendants  # beside this script


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()

    from meshlm import LLM, SamplingParams
    prompts = json.loads(Path(args.prompts).read_text())
    llm = LLM(model=args.model, tensor_parallel_size=args.tp, device="cpu", num_kv_blocks=64,
              max_model_len=512)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True))
    running = descendants(os.getpid())
    llm.shutdown()
    Path(args.out).write_text(json.dumps({
        "pid": os.getpid(),
        "processes_while_running": running,
        "results": [{"token_ids": o.outputs[0].token_ids} for o in outs],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
