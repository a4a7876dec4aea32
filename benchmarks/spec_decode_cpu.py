"""Speculative decoding with n-gram drafts on the CPU: acceptance rate and end-to-end speed-up
against plain decoding, on the default model (SmolLM2-135M-Instruct), batch 1, greedy.

    python3 benchmarks/spec_decode_cpu.py                      # k = 2, 4 and 8
    python3 benchmarks/spec_decode_cpu.py --k 4 --max-tokens 96 --threads 2

The prompts ask the model to edit code or repeat and summarise a text it is given, so its answer
quotes spans of the prompt: what prompt lookup drafts. Every run checks that the speculative
outputs equal the plain ones token for token.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm import LLM, SamplingParams  # noqa: E402

CODE = '''def moving_average(values, window):
    result = []
    for i in range(len(values) - window + 1):
        chunk = values[i:i + window]
        result.append(sum(chunk) / window)
    return result
'''
TEXT = ("The committee met on Tuesday to review the budget for the new library. After a long "
        "discussion, the members agreed to increase the funding for children's books, to extend "
        "the opening hours on weekends, and to hire two more librarians before the end of the year.")
PROMPTS = [
    f"Rename the function moving_average to rolling_mean in this code and show the whole code:\n{CODE}",
    f"Add type hints to this function and return the whole function:\n{CODE}",
    f"Repeat the following text word for word, then summarise it in one sentence:\n{TEXT}",
    f"Rewrite this text, replacing 'committee' by 'board':\n{TEXT}",
]


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[list[list[int]], float]:
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    token_ids = [llm.chat([{"role": "user", "content": p}], params)[0].outputs[0].token_ids for p in prompts]
    return token_ids, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="2,4,8", help="num_speculative_tokens values, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    engine = dict(max_model_len=1024)
    with LLM(**engine) as llm:
        plain, plain_s = run(llm, PROMPTS, params)
    num_tokens = sum(len(t) for t in plain)
    print(f"plain: {num_tokens} tokens in {plain_s:.2f} s = {num_tokens / plain_s:.1f} tok/s")
    print(f"{'k':>3} {'tok/s':>8} {'speed-up':>9} {'accept rate':>12} {'tokens/verify row':>18} {'same':>5}")
    for k in (int(v) for v in args.k.split(",")):
        spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
        with LLM(speculative_config=spec, **engine) as llm:
            outputs, seconds = run(llm, PROMPTS, params)
            stats = llm.engine_core.spec_decode_stats
        print(f"{k:>3} {num_tokens / seconds:>8.1f} {plain_s / seconds:>8.2f}x {stats.acceptance_rate:>12.2f} "
              f"{stats.mean_tokens_per_verify_row:>18.2f} {str(outputs == plain):>5}")


if __name__ == "__main__":
    main()
