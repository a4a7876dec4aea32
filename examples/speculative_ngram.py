"""Speculative decoding with n-gram (prompt lookup) drafts: an answer that repeats its prompt, with
and without drafts; the text is the same, the drafted run takes fewer steps.

    python examples/speculative_ngram.py             (one rank: CPU, or one GPU)
    python examples/speculative_ngram.py --tp 3      (each LLM starts its three ranks under mpiexec)
"""
from __future__ import annotations

import argparse
import time

from meshlm import LLM, SamplingParams

PROMPT = [{"role": "user", "content": "Repeat the following text word for word: The committee met on "
           "Tuesday to review the budget for the new library, and agreed to extend the opening hours."}]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    ns = parser.parse_args()
    params = SamplingParams(temperature=0, max_tokens=64)
    texts = {}
    for spec in (None, NGRAM):
        with LLM(tensor_parallel_size=ns.tp, max_model_len=512, speculative_config=spec) as llm:
            llm.chat(PROMPT, SamplingParams(temperature=0, max_tokens=2))  # warm-up
            start = time.perf_counter()
            texts[spec is None] = llm.chat(PROMPT, params)[0].outputs[0].text
            seconds = time.perf_counter() - start
            stats = llm.engine_core.spec_decode_stats
        extra = "" if stats is None else (f", acceptance {stats.acceptance_rate:.2f}, "
                                          f"{stats.mean_tokens_per_verify_row:.2f} tokens per verify step")
        print(f"{'plain' if spec is None else 'n-gram'}: {seconds:.2f} s{extra}")
    assert texts[True] == texts[False]
    print(texts[False])


if __name__ == "__main__":
    main()
