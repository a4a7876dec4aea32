"""How far an FP8 product moves from exact sums, with and without fast accumulation: for random
operands of the 8B shape's widths, the relative error (over the matrix) of ``torch._scaled_mm``
against the float32 sums of the same float8 operands, beside the error the float8 rounding of the
operands makes against the unquantized product. On a CUDA GPU with float8 tensor cores.

    python3 benchmarks/fp8_accumulation.py [--k 256,4096,14336] [--rows 300]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.kernels import fp8  # noqa: E402


def errors(k: int, rows: int) -> tuple[float, float]:
    """(accumulation error, float8 rounding error), each relative over the [rows, 384] product of
    random operands, with the fast-accumulation switch as it is (tests/gpu/test_fp8_gpu.py bounds them)."""
    w = torch.randn(384, k, generator=torch.Generator().manual_seed(0)).cuda() * 0.05
    w_q, w_scale = fp8.quantize_per_row(w)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).cuda().to(torch.bfloat16)
    got = fp8.scaled_linear(x, w_q, w_scale[:, 0]).float()
    x_q, x_scale = fp8.quantize_activations(x, None)
    sums = fp8.emulated_scaled_mm(x_q, x_scale, w_q, w_scale[:, 0])
    unquantized = x.float() @ w.t()
    return ((got - sums).norm() / sums.norm()).item(), ((sums - unquantized).norm() / unquantized.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="256,4096,14336", help="inner dimensions, comma-separated")
    parser.add_argument("--rows", type=int, default=300)
    ns = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}: relative error of the product over the matrix")
    print(f"{'K':>6}  {'float8 rounding':>16}  {'accumulation':>13}  {'fast accumulation':>18}")
    for k in (int(v) for v in ns.k.split(",")):
        fp8.set_fast_accumulation(False)
        plain, rounding = errors(k, ns.rows)
        fp8.set_fast_accumulation(True)
        fast, _ = errors(k, ns.rows)
        print(f"{k:>6}  {rounding:>15.3%}  {plain:>12.3%}  {fast:>17.3%}")


if __name__ == "__main__":
    main()
