"""The fused row kernels on one GPU against the copy rate: SiLU-and-mul and residual add + RMSNorm
(:mod:`meshlm.kernels.fused_ops`) at Llama-3-8B's widths, bf16 rows, with bf16 and with float8
output, and the row quantizer of the attention output (one pass over whole rows, the default, and
two over 1024-wide pieces, what wider rows take), at the row counts of an FP8 128/128 run's steps
(1712 decodes; 1700 decodes + 6400 prompt tokens). The float8 kernels are also launched at other
warp counts than the default's, to place it. Each kernel is timed as replays of a CUDA graph of
ten launches (the GPU's time alone); "of copy" is the bytes it reads and writes against a
device-to-device copy in the same run.

    python3 benchmarks/row_kernels_bench.py [--rows 1712,8100] [--warps 4,8,16,32] [--out rows.json]

Every launch goes through the engine's own entry points (``TritonOps(row_warps=...)``,
``quantize_rows_triton``). ``--check`` runs each once and compares its output with the default
launch's, bitwise; it is meant for the CPU, in Triton's interpreter, where the warp count leaves the
arithmetic alone (on a GPU the norm's sum over a row spread over other warps may round
differently). ``row_kernels_sass.py`` counts the same kernels' instructions without a GPU.
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
from meshlm.kernels.fp8_quant_triton import quantize_rows_triton  # noqa: E402

HIDDEN, INTERMEDIATE, EPS = 4096, 14336, 1e-5
OPS = fused_ops.TritonOps()


def quantize_rows(x: torch.Tensor, num_warps: int | None, in_pieces: bool = False) -> tuple:
    return quantize_rows_triton(x, FP8_DTYPE, FP8_MAX, MIN_SCALE, num_warps=num_warps, in_pieces=in_pieces)


def _quantized(rows) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.values, rows.scale


def _norm_outputs(result) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    quantized, summed = result
    return quantized.values, quantized.scale, summed


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
    whole = quantize_rows(x, None)
    rows = [("row quantizer, whole rows", "default", num_rows * HIDDEN * 3, lambda: quantize_rows(x, None), None),
            ("row quantizer, two passes", 4, num_rows * HIDDEN * 3, lambda: quantize_rows(x, None, True), whole),
            ("SiLU-and-mul, bf16 out", "default", num_rows * INTERMEDIATE * 6,
             lambda: OPS.silu_and_mul(gate_up), None),
            ("residual add + RMSNorm, bf16 out", "default", num_rows * HIDDEN * 8,
             lambda: OPS.add_rms_norm(x, residual, weight, EPS), None)]
    for w in warps:
        ops = fused_ops.TritonOps(row_warps=w)
        rows.append(("SiLU-and-mul, float8 out", w, silu_bytes + 4 * num_rows,
                     lambda ops=ops: _quantized(ops.silu_and_mul_quantized(gate_up)), _quantized(silu_default)))
        rows.append(("residual add + RMSNorm, float8 out", w, norm_bytes + 4 * num_rows,
                     lambda ops=ops: _norm_outputs(ops.add_rms_norm_quantized(x, residual, weight, EPS)),
                     _norm_outputs((normed, summed))))
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
