"""Single-GPU benchmark: copy bandwidth, meshlm decode steps and throughput on a
Llama-3-8B-shaped bf16 model with random weights, and Hugging Face transformers in the same run.

    python3 benchmarks/gpu_bench.py --out results.json      (on a machine with one free GPU)
    python3 benchmarks/gpu_bench.py --batches 1,64,256,1024 --skip-hf   (large decode batches)
    python3 benchmarks/gpu_bench.py --batches "" --prefill 1x8192,8x2048 --skip-hf   (prefill vs the GEMM rate)

Prints a table last; every number comes from this run on this card.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import LLAMA3_8B, model_dir, weight_bytes  # noqa: E402


def copy_bandwidth(num_bytes: int = 2**30, iters: int = 20) -> float:
    """Device-to-device copy, counting read + write bytes (TB/s)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / iters
    return 2 * num_bytes / seconds / 1e12


MAX_NUM_TOKENS = 8192  # the engine's default token budget, set explicitly: prefill steps are counted with it


def matmul_tflop_s(n: int = 8192, iters: int = 20) -> float:
    """A bf16 n x n x n matmul (cuBLAS), in TFLOP/s: the GEMM rate prefill is measured against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def prefill_flops(cfg: dict, batch: int, length: int) -> float:
    """FLOPs of prefilling ``batch`` prompts of ``length`` tokens: two per weight of the decoder
    layers a token, the attention's two products over the causal triangle, and the LM head on
    each prompt's last token (the only row sampled)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    head_dim = h // heads
    kv = cfg["num_key_value_heads"] * head_dim
    per_token = 2 * layers * (h * (h + 2 * kv) + h * h + 3 * h * inter)
    attention = 4 * layers * heads * head_dim * length * (length + 1) / 2
    return batch * (length * per_token + attention + 2 * cfg["vocab_size"] * h)


def run_prefill(coordinator, batch: int, length: int, gemm_tflop_s: float, repeats: int = 3) -> dict:
    """``batch`` random prompts of ``length`` tokens, one output token each: prompt tokens/s and
    achieved TFLOP/s of the whole model (median of ``repeats`` after a warm-up)."""
    from meshlm import SamplingParams
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(repeats + 1):
        for _ in range(batch):
            coordinator.submit(rng.integers(0, 32000, length).tolist(), params)
        start = time.perf_counter()
        while coordinator.has_unfinished():
            coordinator.step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    tflop_s = prefill_flops(LLAMA3_8B, batch, length) / seconds / 1e12
    return {"batch": batch, "prompt_len": length, "seconds": seconds, "prompt_tok_s": batch * length / seconds,
            "tflop_s": tflop_s, "of_gemm": tflop_s / gemm_tflop_s}


def run_meshlm(coordinator, batch: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """Submit ``batch`` random prompts, step to completion, time every step."""
    from meshlm import SamplingParams
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for _ in range(batch):
        coordinator.submit(rng.integers(0, 32000, input_len).tolist(), params)
    step_times = []
    t0 = time.perf_counter()
    while coordinator.has_unfinished():
        s = time.perf_counter()
        coordinator.step()
        step_times.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    # Steps after the prefill steps are pure decode steps of the whole batch.
    prefill_steps = -(-batch * input_len // MAX_NUM_TOKENS)
    decode = step_times[prefill_steps:-1] or step_times
    return {"batch": batch, "input_len": input_len, "output_len": output_len,
            "decode_step_ms_median": 1e3 * statistics.median(decode),
            "decode_step_ms_p90": 1e3 * float(np.percentile(decode, 90)),
            "ttft_ms": 1e3 * sum(step_times[:prefill_steps + 1]),
            "total_s": total, "output_tok_s": batch * output_len / total}


def run_hf(cfg_dict: dict, batch: int, input_len: int, output_len: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (batch, input_len), device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"batch": batch, "input_len": input_len, "output_len": output_len,
            "decode_step_ms_median": 1e3 * (total - prefill) / (output_len - 1),
            "ttft_ms": 1e3 * prefill, "total_s": total, "output_tok_s": batch * output_len / total}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--lengths", default="128:128")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--hf-lengths", default=None, help="lengths for transformers (default: --lengths)")
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="enable_fused_kernels (Triton small ops); default: the engine's (on with CUDA)")
    parser.add_argument("--prefill", default="", help="batch x prompt length of whole-model prefills, e.g. "
                        "1x8192,8x2048 (lengths are clipped to the model's context - 1)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="default: the engine's automatic value (at least the largest of --batches)")
    ns = parser.parse_args()
    batches = [int(b) for b in ns.batches.split(",") if b]
    prefills = [tuple(int(x) for x in shape.split("x")) for shape in ns.prefill.split(",") if shape]
    # Room for the longest prompt and its token, within the model's context.
    max_model_len = min(max([4096] + [length + 1 for _, length in prefills]), LLAMA3_8B["max_position_embeddings"])
    lengths = [tuple(int(x) for x in pair.split(":")) for pair in ns.lengths.split(",")]

    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["copy_tb_s"] = copy_bandwidth()
    wbytes = weight_bytes(LLAMA3_8B)
    result["weight_gb"] = wbytes / 1e9
    result["floor_step_ms"] = wbytes / (result["copy_tb_s"] * 1e12) * 1e3
    result["gemm_tflop_s"] = matmul_tflop_s()

    from meshlm import LLM
    kwargs = dict(model=str(model_dir("llama3-8b")), load_format="random", skip_tokenizer_init=True,
                  dtype="bfloat16", max_model_len=max_model_len, attention_backend=ns.attention_backend,
                  max_num_tokens=MAX_NUM_TOKENS)
    if ns.no_cuda_graphs:
        kwargs["enable_cuda_graphs"] = False
    kwargs["enable_fused_kernels"] = ns.fused
    kwargs["max_batch_size"] = ns.max_batch_size
    llm = LLM(**kwargs)
    coordinator = llm.engine_core
    runner = llm.local_model_runner()
    result["enable_fused_kernels"] = runner.model.ops.name == "triton"
    result["max_batch_size"] = coordinator.max_batch_size
    result["num_kv_blocks"] = coordinator.num_kv_blocks
    result["graph_memory_gib"] = runner.graph_memory_bytes / 2**30
    if batches and max(batches) > result["max_batch_size"]:
        print(f"warning: batch {max(batches)} > max_batch_size {result['max_batch_size']}: "
              "decode steps will be split", file=sys.stderr)
    run_meshlm(coordinator, 4, 32, 8)  # warm-up
    result["meshlm"] = [run_meshlm(coordinator, b, i, o) for (i, o) in lengths for b in batches]
    context = coordinator.max_model_len
    result["prefill"] = [run_prefill(coordinator, b, min(n, context - 1), result["gemm_tflop_s"]) for b, n in prefills]
    llm.shutdown()
    del llm, coordinator
    gc.collect()
    torch.cuda.empty_cache()
    if not ns.skip_hf:
        hf_lengths = lengths if ns.hf_lengths is None else [
            tuple(int(x) for x in pair.split(":")) for pair in ns.hf_lengths.split(",")]
        result["hf"] = [run_hf(LLAMA3_8B, b, i, o) for (i, o) in hf_lengths for b in batches]
    Path(ns.out).write_text(json.dumps(result, indent=2))

    print(f"\ncard: {result['card']}  copy bandwidth {result['copy_tb_s']:.2f} TB/s  "
          f"weights {result['weight_gb']:.2f} GB  floor {result['floor_step_ms']:.2f} ms/step  "
          f"fused kernels {'on' if result['enable_fused_kernels'] else 'off'}")
    print(f"max_batch_size {result['max_batch_size']}  KV blocks {result['num_kv_blocks']}  "
          f"decode graphs {result['graph_memory_gib']:.2f} GiB")
    print(f"{'engine':8} {'batch':>5} {'in/out':>9} {'step ms':>8} {'ttft ms':>8} {'out tok/s':>10}")
    for name in ("meshlm", "hf"):
        for r in result.get(name, []):
            print(f"{name:8} {r['batch']:>5} {r['input_len']:>4}/{r['output_len']:<4} "
                  f"{r['decode_step_ms_median']:>8.2f} {r['ttft_ms']:>8.1f} {r['output_tok_s']:>10.1f}")
    if result["prefill"]:
        print(f"\nwhole-model prefill (max_num_tokens {MAX_NUM_TOKENS}), against bf16 GEMM "
              f"{result['gemm_tflop_s']:.0f} TFLOP/s")
        print(f"{'batch x prompt':>15} {'seconds':>8} {'prompt tok/s':>13} {'TFLOP/s':>8} {'of GEMM':>8}")
        for r in result["prefill"]:
            print(f"{r['batch']:>6} x {r['prompt_len']:<6} {r['seconds']:>8.3f} {r['prompt_tok_s']:>13.0f} "
                  f"{r['tflop_s']:>8.1f} {r['of_gemm']:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
