"""One layout of a Llama-3-8B-shaped bf16 model with random weights on the GPU machine: greedy
outputs for fixed prompts (to compare layouts) and decode step times.

    python3 benchmarks/gpu_layouts.py --out tp1.json                                 # one GPU
    mpirun -n 2 python3 benchmarks/gpu_layouts.py --tp 2 --out tp2.json              # NCCL
    mpirun -n 4 python3 benchmarks/gpu_layouts.py --tp 2 --pp 2 --out tp2pp2.json
    python3 benchmarks/gpu_layouts.py --compare tp1.json tp2.json ...                # agreement table

Every rank runs the script; only rank 0 returns from LLM(...) and writes the file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 16


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(123)
    return [rng.integers(0, 32000, n).tolist() for n in (7, 64, 200, 33)]


def run(ns) -> None:
    import torch
    from gpu_bench import run_meshlm
    from shapes import model_dir
    from meshlm import LLM, SamplingParams
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    path = model_dir(ns.shape, root=f"/tmp/meshlm-shapes-{rank}")
    llm = LLM(str(path), tensor_parallel_size=ns.tp, pipeline_parallel_size=ns.pp,
              moe_expert_parallel_size=ns.ep, load_format="random",
              skip_tokenizer_init=True, dtype=ns.dtype, max_model_len=2048)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts(), params)
    layout = f"tp{ns.tp}pp{ns.pp}" + (f"ep{ns.ep}" if ns.ep else "")
    result = {"layout": layout, "tp": ns.tp, "pp": ns.pp, "ep": ns.ep, "shape": ns.shape, "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "tokens": [o.outputs[0].token_ids for o in outs],
              "logprobs": [[{str(k): v for k, v in step.items()} for step in o.outputs[0].logprobs] for o in outs]}
    result["dtype"] = ns.dtype
    coordinator = llm.engine_core
    result["timings"] = []
    if not ns.skip_timings:
        run_meshlm(coordinator, 4, 32, 8)  # warm-up
        result["timings"] = [run_meshlm(coordinator, b, 128, 128) for b in (1, 64)]
    Path(ns.out).write_text(json.dumps(result))
    for t in result["timings"]:
        print(f"{result['layout']}: batch {t['batch']:3d} decode step {t['decode_step_ms_median']:.2f} ms, "
              f"{t['output_tok_s']:.0f} output tok/s")
    llm.shutdown()


def compare(files: list[str]) -> None:
    results = [json.loads(Path(f).read_text()) for f in files if Path(f).exists()]
    ref = results[0]
    print(f"{'layout':10} {'dtype':9} {'greedy tokens equal':>20} {'first-step tokens':>18} "
          f"{'max |dlogprob| step 0':>22} {'bs1 ms':>7} {'bs64 ms':>8} {'bs64 tok/s':>10}")
    for r in results:
        equal = sum(a == b for a, b in zip(ref["tokens"], r["tokens"]))
        first = sum(a[0] == b[0] for a, b in zip(ref["tokens"], r["tokens"]))
        diffs = [abs(r["logprobs"][i][0][t] - lp) for i in range(len(ref["tokens"]))
                 for t, lp in ref["logprobs"][i][0].items() if t in r["logprobs"][i][0]]
        t1, t64 = r["timings"] or [{"decode_step_ms_median": float("nan"), "output_tok_s": float("nan")}] * 2
        print(f"{r['layout']:10} {r.get('dtype', ''):9} {equal:>14}/{len(ref['tokens'])} "
              f"{first:>14}/{len(ref['tokens'])} {max(diffs):>22.6f} {t1['decode_step_ms_median']:>7.2f} "
              f"{t64['decode_step_ms_median']:>8.2f} {t64['output_tok_s']:>10.0f}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=None, help="moe_expert_parallel_size (MoE shapes)")
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--out", default="layout.json")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--compare", nargs="+")
    ns = parser.parse_args()
    if ns.compare:
        compare(ns.compare)
    else:
        run(ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
