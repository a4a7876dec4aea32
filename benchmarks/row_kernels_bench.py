"""The fused row kernels on one GPU against the copy rate: SiLU-and-mul and residual add + RMSNorm
(:mod:`meshlm.kernels.fused_ops`) at Llama-3-8B's widths, bf16 rows, with bf16 and with float8
output, and the row quantizer of the attention output (one pass over whole rows, the default, and
two over 1024-wide pieces, what wider rows take), at the row counts of an FP8 128/128 run's steps
(1712 decodes; 1700 decodes + 6400 prompt tokens). The float8 kernels are also launched at other
warp counts than the default's, to place it. Each kernel is timed as replays of a CUDA graph of
ten launches (the GPU's time alone); "of copy" is the bytes it reads and writes against a
device-to-device copy in the same run.

    python3 benchmarks/row_kernels_bench.py [--rows 1712,8100] [--warps 4,8,16,32] [--out rows.json]

``--check`` runs each launch once and compares its output with the default launch's, bitwise:
that the launches timed here are the kernels the engine runs. It is meant for the CPU, in Triton's
interpreter, where the warp count leaves the arithmetic alone; on a GPU the norm's sum over a row
spread over other warps may round differently. ``row_kernels_sass.py`` counts the same kernels'
instructions without a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meshlm.kernels import fused_ops  # noqa: E402
from meshlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE  # noqa: E402
from meshlm.kernels.fp8_quant_triton import (_quantize_rows_kernel, _quantize_whole_rows_kernel,  # noqa: E402
                                              quantize_rows_triton)

HIDDEN, INTERMEDIATE, EPS = 4096, 14336, 1e-5
OPS = fused_ops.TritonOps()


def silu_quantized(gate_up: torch.Tensor, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU-and-mul with float8 output, launched as TritonOps launches it but with ``num_warps``."""
    width = gate_up.shape[1] // 2
    out = torch.empty((gate_up.shape[0], width), dtype=FP8_DTYPE, device=gate_up.device)
    scale = torch.empty((gate_up.shape[0], 1), dtype=torch.float32, device=gate_up.device)
    fused_ops._silu_and_mul_quantized_kernel[(gate_up.shape[0],)](
        out, scale, gate_up, out.stride(0), gate_up.stride(0), width, BLOCK=triton_block(width), FP8_MAX=FP8_MAX,
        MIN_SCALE=MIN_SCALE, num_warps=num_warps, **fused_ops._pdl(gate_up.device))
    return out, scale


def norm_quantized(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, num_warps: int) -> tuple:
    """Residual add + RMSNorm with float8 output, as TritonOps launches it but with ``num_warps``."""
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    summed = torch.empty_like(x)
    fused_ops._add_rms_norm_kernel[(x.shape[0],)](
        out, summed, scale, x, residual, weight, out.stride(0), summed.stride(0), x.stride(0), residual.stride(0),
        x.shape[1], EPS, HAS_RESIDUAL=True, QUANTIZE=True, FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
        BLOCK=triton_block(x.shape[1]), num_warps=num_warps, **fused_ops._pdl(x.device))
    return out, scale, summed


def quantize_rows(x: torch.Tensor, num_warps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The row quantizer over whole rows with ``num_warps``, or (None) its two passes over 1024-wide
    pieces in 4 warps (what rows wider than MAX_WHOLE_ROW take)."""
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    kernel, block = (_quantize_rows_kernel, 1024) if num_warps is None else (_quantize_whole_rows_kernel,
                                                                              triton_block(x.shape[1]))
    kernel[(x.shape[0],)](x, q, scale, x.shape[1], x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
                          BLOCK=block, num_warps=num_warps or 4, **fused_ops._pdl(x.device))
    return q, scale


def triton_block(width: int) -> int:
    import triton
    return triton.next_power_of_2(width)


def cases(num_rows: int, warps: list[int], device: str) -> list[tuple]:
    """(kernel, warps or "default", bytes moved, a call, its output as the default launch gives it)."""
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(num_rows, 2 * INTERMEDIATE, generator=gen, device=device).to(torch.bfloat16)
    x = torch.randn(num_rows, HIDDEN, generator=gen, device=device).to(torch.bfloat16)
    residual = torch.randn(num_rows, HIDDEN, generator=gen, device=device).to(torch.bfloat16)
    weight = (torch.rand(HIDDEN, generator=gen, device=device) + 0.5).to(torch.bfloat16)
    silu_bytes = num_rows * (2 * INTERMEDIATE * 2 + INTERMEDIATE)
    norm_bytes = num_rows * HIDDEN * (2 + 2 + 2 + 1)
    silu_default = OPS.silu_and_mul_quantized(gate_up)
    normed, summed = OPS.add_rms_norm_quantized(x, residual, weight, EPS)
    whole = quantize_rows_triton(x, FP8_DTYPE, FP8_MAX, MIN_SCALE)
    rows = [("row quantizer, whole rows", "default", num_rows * HIDDEN * 3,
             lambda: quantize_rows_triton(x, FP8_DTYPE, FP8_MAX, MIN_SCALE), None),
            ("row quantizer, two passes", 4, num_rows * HIDDEN * 3, lambda: quantize_rows(x, None), whole),
            ("SiLU-and-mul, bf16 out", "default", num_rows * INTERMEDIATE * 6,
             lambda: OPS.silu_and_mul(gate_up), None),
            ("residual add + RMSNorm, bf16 out", "default", num_rows * HIDDEN * 8,
             lambda: OPS.add_rms_norm(x, residual, weight, EPS), None)]
    for w in warps:
        rows.append(("SiLU-and-mul, float8 out", w, silu_bytes + 4 * num_rows, lambda w=w: silu_quantized(gate_up, w),
                     (silu_default.values, silu_default.scale)))
        rows.append(("residual add + RMSNorm, float8 out", w, norm_bytes + 4 * num_rows,
                     lambda w=w: norm_quantized(x, residual, weight, w), (normed.values, normed.scale, summed)))
        rows.append(("row quantizer, whole rows", w, num_rows * HIDDEN * 3, lambda w=w: quantize_rows(x, w), whole))
    return rows


def check(rows: list[tuple]) -> None:
    for name, warps, _, call, expected in rows:
        if expected is None:
            continue
        got = call()
        for g, e in zip(got, expected):
            same = torch.equal(g.view(torch.uint8), e.view(torch.uint8)) if g.dtype == FP8_DTYPE else torch.equal(g, e)
            assert same, f"{name}, {warps} warps: differs from the default launch"
        print(f"{name}, {warps} warps: the default launch's output, bitwise", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1712,8100", help="row counts, comma-separated")
    parser.add_argument("--warps", default="4,8,16,32", help="warp counts for the float8 kernels")
    parser.add_argument("--check", action="store_true", help="compare each launch with the default's, untimed")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warps = [int(w) for w in args.warps.split(",")]
    if args.check:
        for num_rows in (int(r) for r in args.rows.split(",")):
            check(cases(num_rows, warps, device))
        return
    from attention_bench import copy_tb_s, graph_ms
    copy_tb_s()  # the first timed work of a process runs slow: not measured
    copy = copy_tb_s()
    results = []
    for num_rows in (int(r) for r in args.rows.split(",")):
        for name, w, num_bytes, call, _ in cases(num_rows, warps, device):
            ms = graph_ms(call)
            rate = num_bytes / (ms * 1e-3) / 1e12
            results.append(dict(kernel=name, rows=num_rows, warps=w, us=1e3 * ms, tb_s=rate, of_copy=rate / copy))
            print(f"{name:<36} {num_rows:5d} rows, {str(w):>7} warps: {1e3 * ms:8.1f} us, {rate:5.2f} TB/s, "
                  f"{100 * rate / copy:5.1f} % of copy", flush=True)
    print(f"\n{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s (read + write)")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(copy_tb_s=copy, results=results), indent=1))


if __name__ == "__main__":
    main()
