"""The fused row kernels' machine code for a GPU, without one: compiles RMSNorm and SiLU-and-mul
(:mod:`meshlm.kernels.fused_ops`, bf16 rows, plain and with float8 output) and the whole-row
quantizer (:mod:`meshlm.kernels.fp8_quant_triton`) for an sm_90 target, as a launch at
Llama-3-8B's widths specializes them, and counts their SASS instructions per element of a row:
what a row costs the SM's schedulers, beside the bytes it moves. An H200 issues about 33 x 10^12
thread instructions a second (132 SMs, four warp instructions a cycle each, at 1.98 GHz) and
copies about 4.2 TB/s, so SiLU-and-mul with float8 output (2 + 2 bytes read and 1 written an
element) runs out of issue before bandwidth beyond about 40 instructions an element, and then
only if the rows' loads overlap other rows' arithmetic.

    python3 benchmarks/row_kernels_sass.py

The count is static: every instruction of the compiled kernel once, cold paths (a rounded
division's slow path) included, divided by the elements one thread holds. Needs Triton with its
CUDA backend (its ptxas, nvdisasm and cuobjdump), no GPU.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_sass import run_tool  # noqa: E402
from meshlm.kernels import fused_ops  # noqa: E402
from meshlm.kernels.fp8 import FP8_MAX, MIN_SCALE  # noqa: E402
from meshlm.kernels.fp8_quant_triton import _quantize_whole_rows_kernel, quantizer_warps, row_warps  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 14336
FP8 = dict(FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE)


def kernels() -> dict[str, tuple]:
    """name -> (kernel, pointer dtypes, constexprs, warps, elements a row): as fused_ops launches them."""
    silu_block, norm_block = triton.next_power_of_2(INTERMEDIATE), triton.next_power_of_2(HIDDEN)
    norm = dict(out_ptr="bf16", residual_out_ptr="bf16", scale_ptr="fp32", x_ptr="bf16", residual_ptr="bf16",
                weight_ptr="bf16")
    return {
        "SiLU-and-mul, bf16 out (1024 columns a program)": (
            fused_ops._silu_and_mul_kernel, dict(out_ptr="bf16", gate_up_ptr="bf16"),
            dict(BLOCK=1024, PDL=True), 4, 1024),
        "SiLU-and-mul, float8 out (a whole row)": (
            fused_ops._silu_and_mul_quantized_kernel, dict(out_ptr="fp8e4nv", scale_ptr="fp32", gate_up_ptr="bf16"),
            dict(BLOCK=silu_block, PDL=True, **FP8), fused_ops.silu_quantized_warps(silu_block), silu_block),
        "residual add + RMSNorm, bf16 out": (
            fused_ops._add_rms_norm_kernel, norm,
            dict(HAS_RESIDUAL=True, QUANTIZE=False, BLOCK=norm_block, PDL=True, **FP8),
            row_warps(norm_block), norm_block),
        "residual add + RMSNorm, float8 out": (
            fused_ops._add_rms_norm_kernel, {**norm, "out_ptr": "fp8e4nv"},
            dict(HAS_RESIDUAL=True, QUANTIZE=True, BLOCK=norm_block, PDL=True, **FP8),
            row_warps(norm_block), norm_block),
        "row quantizer, whole rows (attention output)": (
            _quantize_whole_rows_kernel, dict(x_ptr="bf16", q_ptr="fp8e4nv", scale_ptr="fp32"),
            dict(BLOCK=norm_block, PDL=True, **FP8), quantizer_warps(norm_block), norm_block),
    }


def compile_kernel(kernel, pointers: dict, constexprs: dict, num_warps: int, capability: int):
    """Pointers and integer arguments marked 16-divisible, as a launch over aligned rows of these
    widths specializes them; ``eps`` a float."""
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + pointers[param.name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif param.name == "eps":
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=dict(num_warps=num_warps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability to compile for")
    args = parser.parse_args()
    print(f"sm_{args.capability}: instructions a thread (static), per element, registers a thread")
    for name, (kernel, pointers, constexprs, num_warps, elements) in kernels().items():
        compiled = compile_kernel(kernel, pointers, constexprs, num_warps, args.capability)
        cubin = compiled.asm["cubin"]
        sass = run_tool("nvdisasm", ["-c"], cubin)
        count = sum(1 for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line))
        registers = re.search(r"REG:(\d+)", run_tool("cuobjdump", ["--dump-resource-usage"], cubin))
        per_element = count / (elements / (num_warps * 32))
        print(f"{name:<50} {count:6d} {per_element:6.1f}  regs {registers.group(1) if registers else '?'}", flush=True)


if __name__ == "__main__":
    main()
