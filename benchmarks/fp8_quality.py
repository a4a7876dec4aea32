"""FP8 quality on the CPU: perplexity and greedy agreement of FP8 weights against the unquantized model.

    PYTHONPATH=. python benchmarks/fp8_quality.py                          # the default model, fp32
    PYTHONPATH=. python benchmarks/fp8_quality.py --kv-cache-dtype fp8     # with an FP8 KV cache as well
    PYTHONPATH=. python benchmarks/fp8_quality.py --model DIR --checkpoint-format ct-channel --output-json q.json
    PYTHONPATH=. python benchmarks/fp8_quality.py --ignored-layers first,last --runs fp8,published
    PYTHONPATH=. python benchmarks/fp8_quality.py --runs bfloat16                # bf16 against fp32

Runs of the same model (default: SmolLM2-135M-Instruct, ``--dtype float32``), chosen by ``--runs``
(default ``fp8,published``), after the reference:

- ``unquantized`` (always, first): the checkpoint as it is, the reference of the others;
- ``bfloat16``: the checkpoint as it is in bfloat16, unquantized;
- ``fp8``: ``quantization="fp8"``, weights quantized at load;
- ``published``: an FP8 checkpoint in a published format (``--checkpoint-format``, written by
  tests/model_factory.py's writer into a temporary folder), loaded as it is.

``--ignored-layers`` keeps modules out of FP8 in both FP8 runs: the ``fp8`` run lists them through
``hf_overrides``' ``quantization_config.ignored_layers``, the published checkpoint stores them
unquantized and lists them. Comma-separated entries: ``first`` and ``last`` (decoder layers), layer
numbers, or module names and name parts as quantization_config takes them (``model.layers.5.mlp``).

Each reports the perplexity of benchmarks/data/pride_and_prejudice_ch1-2.txt (Jane Austen, 1813,
chapters 1 and 2 of Project Gutenberg's text; public domain) in windows of ``--window`` tokens, each
window's tokens scored given the ones before them, and the first 16 greedy tokens of 20 fixed chat
prompts, counted against the unquantized run's. ``--kv-cache-dtype`` is passed to the engine only
when given.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEXT = REPO / "benchmarks" / "data" / "pride_and_prejudice_ch1-2.txt"
PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 12?", "Explain photosynthesis in one sentence.",
    "Who wrote Romeo and Juliet?", "Give me a synonym for happy.", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.", "List the days of the week.", "What does a bee make?",
    "Why is the sky blue?", "Suggest a name for a pet cat.", "What is the largest planet?",
    "How do I make a cup of tea?", "What is a prime number?", "Tell me a fun fact about owls.",
    "What language is spoken in Brazil?", "Describe a rainy day in five words.",
]
NUM_GREEDY_TOKENS = 16


def window_plan(token_ids: list[int], block_size: int):
    """One step that scores every token of a window: token i is its own one-token sequence whose
    context is tokens 0..i in shared blocks, so the step is a causal prefill with every row sampled."""
    from meshlm.protocol import StepPlan
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    return StepPlan(
        input_ids=np.asarray(token_ids, dtype=np.int64), positions=np.arange(n, dtype=np.int64),
        slot_mapping=np.arange(n, dtype=np.int64), query_start_loc=np.arange(n + 1, dtype=np.int32),
        seq_lens=np.arange(1, n + 1, dtype=np.int32),
        block_tables=np.tile(np.arange(num_blocks, dtype=np.int32), (n, 1)),
        sample_rows=np.arange(n, dtype=np.int64), sample_request_ids=[f"t{i}" for i in range(n)])


def perplexity(model_dir: str, engine_kw: dict, window: int) -> float:
    from meshlm.config import EngineArgs, EngineConfig
    from meshlm.engine.tokenizer import Tokenizer
    from meshlm.executor.model_runner import ModelRunner
    from meshlm.parallel.groups import ParallelGroups
    config = EngineConfig.from_args(EngineArgs(model_dir, max_model_len=window, **engine_kw))
    runner = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
    block_size = 16
    runner.allocate_kv_cache(-(-window // block_size), block_size)
    ids = Tokenizer(config.model_dir).encode(TEXT.read_text())
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = runner.forward_logits(window_plan(chunk, block_size))  # [len(chunk), vocab]
        logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)
        nll -= float(logprobs[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum())
        count += len(chunk) - 1
    runner.shutdown()
    return math.exp(nll / count)


def greedy(model_dir: str, engine_kw: dict) -> list[list[int]]:
    from meshlm import LLM, SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=NUM_GREEDY_TOKENS, ignore_eos=True)
    with LLM(model_dir, **engine_kw) as llm:
        outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    return [o.outputs[0].token_ids for o in outs]


RUNS = ("bfloat16", "fp8", "published")


def ignored_modules(spec: str | None, num_layers: int) -> list[str]:
    """``--ignored-layers``' entries as module names: ``first``, ``last`` and numbers name decoder layers."""
    layers = {"first": 0, "last": num_layers - 1}
    entries = [e.strip() for e in (spec or "").split(",") if e.strip()]
    return [f"model.layers.{layers[e] if e in layers else e}" if e in layers or e.isdigit() else e for e in entries]


def run_settings(names: list[str], model_dir: str, published: str, args, ignored: list[str]) -> dict:
    """{run name: (model directory, engine arguments beyond the common ones)}, the reference first."""
    fp8_kw = {"quantization": "fp8"}
    if ignored:
        fp8_kw["hf_overrides"] = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                          "ignored_layers": ignored}}
    every = {"bfloat16": (model_dir, {"dtype": "bfloat16"}), "fp8": (model_dir, fp8_kw),
             f"published ({args.checkpoint_format})": (published, {})}
    chosen = {"unquantized": (model_dir, {})}
    for name in names:
        key = next(k for k in every if k.split(" ")[0] == name)
        chosen[key] = every[key]
    return chosen


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the built-in default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-dtype", default=None, help="passed to the engine only when given")
    parser.add_argument("--checkpoint-format", default="hf-fp8",
                        help="published format of the third run (tests/model_factory.py FP8_FORMATS)")
    parser.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    parser.add_argument("--runs", default="fp8,published", help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--ignored-layers", default=None,
                        help="kept unquantized in the FP8 runs: first, last, layer numbers or module names")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not set(names) <= set(RUNS):
        parser.error(f"--runs {args.runs!r}: choose among {', '.join(RUNS)}")
    from meshlm.weights.model_config import ModelConfig
    from meshlm.weights.resolve import resolve_model_on_ranks
    from tests.model_factory import write_fp8_checkpoint
    model_dir = str(resolve_model_on_ranks(args.model, None, None))
    base_kw = {"dtype": args.dtype, "device": "cpu"}
    if args.kv_cache_dtype:
        base_kw["kv_cache_dtype"] = args.kv_cache_dtype
    ignored = ignored_modules(args.ignored_layers, ModelConfig.from_dir(model_dir).num_layers)
    report = {"model": args.model or Path(model_dir).name, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
              "text": TEXT.name, "window": args.window, "ignored_layers": ignored, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        published = ""
        if "published" in names:
            published = str(write_fp8_checkpoint(model_dir, Path(tmp) / "fp8", args.checkpoint_format,
                                                 calibration_prompts=[[1, 2, 3]], ignore=ignored))
        runs = run_settings(names, model_dir, published, args, ignored)
        reference = None
        for name, (path, kw) in runs.items():
            ppl = perplexity(path, {**base_kw, **kw}, args.window)
            tokens = greedy(path, {**base_kw, **kw})
            reference = reference or tokens
            equal = sum(t == r for t, r in zip(tokens, reference))
            report["runs"][name] = {"perplexity": ppl, "greedy_equal": equal, "num_prompts": len(PROMPTS)}
            base_ppl = report["runs"]["unquantized"]["perplexity"]
            print(f"{name:32s} perplexity {ppl:8.4f} ({100 * (ppl / base_ppl - 1):+.2f} %)   "
                  f"first {NUM_GREEDY_TOKENS} greedy tokens equal on {equal}/{len(PROMPTS)} prompts", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
