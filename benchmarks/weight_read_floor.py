"""How fast one kernel a weight can stream a batch-1 decode step's weights: the floor of a step
made of one kernel per linear layer, against the small-batch product that runs there.

    python3 benchmarks/weight_read_floor.py [--layers 32] [--replays 20] [--out floor.json]

Llama-3-8B's bf16 weights, every layer's own (QKV 6144 x 4096, output 4096 x 4096, gate/up 28672 x
4096, down 4096 x 14336; 13.96 GB for 32 layers) and the LM head (128256 x 4096), in the order a
decode step reads them. Each chain is captured in one CUDA graph and replayed; per chain the
milliseconds a replay and the bytes over that time:

- ``read``: a kernel that only reads each weight (sums it; programs a multiple of the SM count,
  each striding over the weight ``block`` elements at a time), launched as the engine launches its
  Triton kernels (programmatic dependent launch where the GPU has it), for a few launch shapes;
- ``gemm``: the product of one row with each weight as the engine runs it (kernels/fp8_gemm_triton.py
  with its recorded launch shapes, or kernels/gemv_triton.py where the card recorded one for the
  shape), the LM head by cuBLAS;
- ``cublas``: every product by cuBLAS (``torch.mm``; not with ``--fp8``).

``--fp8``: the layers' weights in float8 e4m3 (scaled per output channel), as ``--quantization fp8``
stores them; the read kernel reads their bytes.

The read chain's time is what a step of one kernel per weight can reach: the weights' bytes over
it, against the card's copy rate (GPU.md), is the price of the kernel boundaries.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.kernels.fp8_gemm_triton import fp8_weight_gemm  # noqa: E402
from meshlm.kernels.triton_launch import num_sms, programmatic_launch  # noqa: E402
from meshlm.kernels.triton_pdl import wait_for_previous_kernel  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LM_HEAD = (128256, 4096)
# (programs per SM, elements a program loads per step, warps)
READ_SHAPES = [(4, 4096, 8), (8, 2048, 4), (16, 1024, 4), (16, 2048, 4), (32, 512, 4), (32, 1024, 4), (8, 1024, 2),
               (16, 512, 2)]


@triton.jit
def _read_kernel(src_ptr, out_ptr, num_elements, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    pid, num_programs = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * BLOCK, num_elements, num_programs * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offsets, mask=offsets < num_elements, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def read(weight: torch.Tensor, out: torch.Tensor, shape: tuple[int, int, int]) -> None:
    per_sm, block, warps = shape
    pdl = programmatic_launch(weight.device)
    grid = per_sm * num_sms(weight.device)
    _read_kernel[(grid,)](weight, out, weight.numel(), BLOCK=block, PDL=pdl, launch_pdl=pdl, num_warps=warps)


def timed_chain(run, replays: int) -> float:
    """Milliseconds a replay of ``run`` captured in one CUDA graph (after a warm-up call)."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--fp8", action="store_true", help="the layers' weights in float8 e4m3 (the LM head bf16)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.float8_e4m3fn if args.fp8 else torch.bfloat16
    layers = [{name: (torch.randn(shape, device="cuda") * 0.02).to(dtype) for name, shape in SHAPES.items()}
              for _ in range(args.layers)]
    lm_head = torch.randn(LM_HEAD, device="cuda", dtype=torch.bfloat16) * 0.02
    weights = [w for layer in layers for w in layer.values()] + [lm_head]
    total_bytes = sum(w.numel() * w.element_size() for w in weights)
    sums = torch.empty(max(s[0] for s in READ_SHAPES) * num_sms(torch.device("cuda")), device="cuda")
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
    rows = {}
    for shape in READ_SHAPES:
        rows[f"read {shape[0]}/SM x {shape[1]} x {shape[2]} warps"] = timed_chain(
            lambda s=shape: [read(w.view(torch.uint8) if args.fp8 else w, sums, s) for w in weights], args.replays)

    scales = {n: torch.full((n,), 1e-3, device="cuda") for n in {w.shape[0] for w in weights}} if args.fp8 else {}

    def gemm_chain(small_batch: bool) -> None:
        for w in weights[:-1]:
            xw = x[w.shape[1]]
            fp8_weight_gemm(xw, w, scales.get(w.shape[0])) if small_batch else torch.mm(xw, w.t())
        torch.mm(x[4096], lm_head.t())
    rows["gemm (small-batch kernel, LM head by cuBLAS)"] = timed_chain(lambda: gemm_chain(True), args.replays)
    if not args.fp8:
        rows["cublas"] = timed_chain(lambda: gemm_chain(False), args.replays)
    print(f"card: {torch.cuda.get_device_name(0)}; {len(weights)} weights ({dtype} layers), {total_bytes / 1e9:.2f} GB")
    for name, ms in rows.items():
        print(f"{name:48s} {ms:7.3f} ms  {total_bytes / (ms / 1e3) / 1e12:5.2f} TB/s")
    if args.out:
        args.out.write_text(json.dumps({"card": torch.cuda.get_device_name(0), "fp8": args.fp8, "bytes": total_bytes,
                                        "chains_ms": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
