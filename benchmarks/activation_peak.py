"""The memory a step takes beyond the weights, KV pool and graphs, against the reserve set aside for it.

    python3 benchmarks/activation_peak.py --shape llama3-8b
    python3 benchmarks/activation_peak.py --shape llama3-8b --max-num-tokens 16384 --quantization fp8

On one GPU, with random weights of a named shape (benchmarks/shapes.py), two workloads after
start-up, each from a reset of the allocator's peak:

- ``prefill``: one step of ``max_num_tokens`` prompt tokens (prompts of ``--prompt-len``, one
  output token each, greedy): the activations of the widest step;
- ``sampling``: ``max_batch_size`` one-token prompts sampled with every filter and penalty at
  once (temperature, top-k, top-p, min-p, the three penalties, 5 logprobs): the sampler's widest step.

Each prints the peak of allocated memory above what was allocated before it (weights, pool,
graphs) beside its part of the reserve (executor/memory.py: activations, and the sampler's
logits, each with the fixed part that covers the allocator's slack), and fails (exit 1) when a
peak passes its part.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import model_dir  # noqa: E402

GiB = 2**30


def peak_of(llm, prompts: list[list[int]], params) -> int:
    """Bytes allocated at the peak of generating ``prompts``, above what was allocated before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def max_num_tokens(llm) -> int:
    return llm.engine_core.scheduler.config.max_num_tokens


def reserve_parts(llm) -> dict[str, int]:
    """The reserve's parts for this engine (executor/memory.py's arithmetic)."""
    from meshlm.executor import memory
    runner, max_batch_size = llm.local_model_runner(), llm.engine_core.max_batch_size
    whole = memory.activation_reserve_bytes(runner.cfg, 1, max_num_tokens(llm), max_batch_size, runner.dtype.itemsize)
    logits = memory.logits_reserve_bytes(runner.cfg, max_batch_size)
    fixed = memory.FIXED_RESERVE_BYTES
    return {"activations": whole - logits - fixed, "logits": logits, "fixed": fixed}


def measure(llm, prompt_len: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """(workload, measured peak, its part of the reserve without the fixed part) for both workloads."""
    from meshlm import SamplingParams
    parts = reserve_parts(llm)
    rng = np.random.default_rng(seed)
    vocab = llm.engine_core.vocab_size
    num_prompts = max(1, max_num_tokens(llm) // prompt_len)
    prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(num_prompts)]
    prefill = peak_of(llm, prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    rows = [rng.integers(0, vocab, 1).tolist() for _ in range(llm.engine_core.max_batch_size)]
    sampled = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, presence_penalty=0.5,
                             frequency_penalty=0.5, repetition_penalty=1.1, logprobs=5, max_tokens=2,
                             ignore_eos=True, seed=1)
    sampling = peak_of(llm, rows, sampled)
    return [("prefill", prefill, parts["activations"]), ("sampling", sampling, parts["logits"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--max-num-tokens", type=int, default=None, help="default: the engine's for the card")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the engine's automatic one")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    ns = parser.parse_args()
    from meshlm import LLM
    llm = LLM(str(model_dir(ns.shape)), load_format="random", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=4096, max_num_tokens=ns.max_num_tokens, max_batch_size=ns.max_batch_size,
              kv_cache_dtype=ns.kv_cache_dtype, **({"quantization": ns.quantization} if ns.quantization else {}))
    fixed = reserve_parts(llm)["fixed"]
    rows = [(name, peak, part + fixed) for name, peak, part in measure(llm, ns.prompt_len)]
    print(f"card: {torch.cuda.get_device_name(0)}  shape={ns.shape}  quantization={ns.quantization}  "
          f"max_num_tokens={max_num_tokens(llm)}  max_batch_size={llm.engine_core.max_batch_size}")
    print("workload   measured peak   reserve part (with the fixed part)")
    for name, peak, part in rows:
        print(f"{name:<9} {peak / GiB:10.2f} GiB   {part / GiB:10.2f} GiB   {'ok' if peak <= part else 'OVER'}")
    llm.shutdown()
    return 0 if all(peak <= part for _, peak, part in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
