"""The weight products' recorded launch shapes compile for an H100/H200 (sm_90), without a GPU.

    python3 -m pytest -q tests/gpu/test_kernels_compile_sm90.py   # Triton installed, no GPU needed

The interpreter runs a kernel as Python, so code that Triton's compiler rejects can pass every
interpreter test (a helper returning from inside a constexpr ``if``: the compiler traces the code
after such a return too). Here, in a process without ``TRITON_INTERPRET`` (whose kernels are
Python functions, not compilable ones), each launch shape of ``meshlm/kernels/configs/`` is compiled to
sm_90 code with the constexprs its launch passes, at one row (Triton specializes an integer
argument equal to 1) and at the entry's most rows. Needs Triton; no GPU.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from meshlm.kernels import fp8_gemm_triton, gemv_triton  # noqa: E402
from meshlm.kernels.tuned_configs import CONFIG_DIR  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="compiles the kernels: run without TRITON_INTERPRET")]

SM90 = GPUTarget("cuda", 90, 32)
INT_ARGS = {"M", "N", "K", "k_per_split", "stride_xm", "stride_wn", "stride_om", "num_partials"}


def _entries(kernel: str) -> list[tuple[str, dict]]:
    cases = []
    for path in sorted(CONFIG_DIR.glob(f"{kernel}_*.json")):
        for entry in json.loads(path.read_text())["entries"]:
            cases.append((f"{path.stem}:{entry['n']}x{entry['k']}<={entry['max_rows']}", entry))
    return cases


def _pointer_types(fp8: bool) -> dict[str, str]:
    """bf16 rows and outputs, float8 or bf16 weights, int32 split counters (other pointers float32)."""
    return {"out_ptr": "*bf16", "x_ptr": "*bf16", "bias_ptr": "*bf16", "counter_ptr": "*i32",
            "w_ptr": "*fp8e4nv" if fp8 else "*bf16", "res_ptr": "*bf16", "gamma_ptr": "*bf16", "scaled_ptr": "*bf16",
            "eps": "fp32"}


def compile_sm90(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int = 3,
                 maxnreg: int | None = None):
    """The kernel compiled for sm_90: pointers typed by ``pointer_types`` (others float32), integer
    arguments as i32 (``M`` as the constant 1 when ``constexprs`` names it), the rest constexprs;
    pointers and the sizes and strides of INT_ARGS marked 16-divisible, as a launch at the 8B's
    shapes specializes them (Triton's pipeline copies tiles ahead only where it knows the alignment)."""
    signature, attrs = {}, {}
    for index, p in enumerate(kernel.params):
        if p.is_constexpr or p.name in constexprs:
            signature[p.name] = "constexpr"
            continue
        signature[p.name] = "i32" if p.name in INT_ARGS else pointer_types.get(p.name, "*fp32")
        if p.name in INT_ARGS or signature[p.name].startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))


def registers_and_spills(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, bytes of local memory a thread) of a compiled kernel, by the cuobjdump
    that Triton ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"LOCAL:(\d+)", usage).group(1))


@pytest.mark.parametrize("name,entry", _entries("fp8_weight_gemm") + _entries("bf16_weight_gemm"),
                         ids=[c[0] for c in _entries("fp8_weight_gemm") + _entries("bf16_weight_gemm")])
@pytest.mark.parametrize("one_row", [True, False])
def test_small_batch_launch_shapes_compile(name, entry, one_row):
    tiles = fp8_gemm_triton.FP8GemmTiles(**entry["tiles"])
    fp8 = name.startswith("fp8")
    types = _pointer_types(fp8)
    rows = 1 if one_row else entry["max_rows"]
    constexprs = dict(BLOCK_M=fp8_gemm_triton._block_m(rows), BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                      IS_SPLIT=tiles.split_k > 1, SERIAL_REDUCE=tiles.split_k > 1 and tiles.serial_reduce,
                      EVEN_K=entry["k"] % tiles.block_k == 0, SWAP_AB=tiles.swap_ab,
                      ASM_WIDEN=tiles.asm_widen and fp8, SCALE=2 if fp8 else 0, HAS_BIAS=False,
                      DOT_PRECISION="tf32", DOT_IN_FP32=False, PDL=True, L2_PREFETCH=tiles.l2_prefetch,
                      GATED=False)
    if one_row:
        constexprs["M"] = 1
    compiled = compile_sm90(fp8_gemm_triton._fp8_weight_gemm_kernel, types, constexprs, tiles.num_warps,
                            tiles.num_stages)
    assert "griddepcontrol.wait" in compiled.asm["ptx"]


def _one_row_cases() -> list[tuple[str, dict, bool, str]]:
    """Each one-row launch shape plain, and gated (SiLU-and-mul at its end) where K is not split, as
    kernels/one_row.py's one_row_silu_and_mul launches it; where K is not split also with the norm
    inside: the plain product adding the residual (``add``: one_row_add_norm), the gated one taking
    the norm (``in``: NormIn)."""
    entries = _entries("fp8_weight_gemv") + _entries("bf16_weight_gemv")
    cases = []
    for name, entry in entries:
        unsplit = entry["tiles"].get("split_k", 1) == 1
        cases += [(name, entry, False, "none")] + ([(name, entry, False, "add")] if unsplit else [])
        cases += [(name, entry, True, norm) for norm in ("none", "in") if unsplit]
    return cases


@pytest.mark.parametrize("name,entry,gated,norm", _one_row_cases(),
                         ids=[f"{c[0]}{':gated' if c[2] else ''}:{c[3]}" for c in _one_row_cases()])
@pytest.mark.parametrize("preload", [True, False])
def test_one_row_launch_shapes_compile(name, entry, gated, norm, preload):
    tiles = gemv_triton.GemvTiles(**entry["tiles"])
    fp8 = name.startswith("fp8")
    types = _pointer_types(fp8)
    constexprs = dict(BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, IS_SPLIT=tiles.split_k > 1,
                      EVEN_K=entry["k"] % tiles.block_k == 0, SCALE=2 if fp8 else 0, HAS_BIAS=False, PDL=True,
                      PRELOAD=preload, GATED=gated, STAGES=tiles.num_stages, NORM_IN=norm == "in",
                      BLOCK_P=512 if norm == "in" else 1, ADD_NORM=norm == "add")
    # as gemv_triton launches the product adding the residual: its registers capped, no spills
    cap = gemv_triton.ADD_NORM_MAX_REGISTERS if norm == "add" and tiles.num_warps == 4 else None
    compiled = compile_sm90(gemv_triton._one_row_kernel, types, constexprs, tiles.num_warps, maxnreg=cap)
    if cap is not None:
        registers, local = registers_and_spills(compiled.asm["cubin"])
        assert registers <= cap and local == 0, (registers, local)
    ptx = compiled.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    # the preload: weight loads (and only loads) before the wait; without it none
    assert ("ld.global" in ptx[:wait]) == preload
    # tiles in flight: copied ahead (cp.async) after the wait, none before it
    assert ("cp.async" in ptx[wait:]) == (tiles.num_stages > 1) and "cp.async" not in ptx[:wait]


@pytest.mark.parametrize("name,entry", [c for c in _entries("fp8_weight_gemv") + _entries("bf16_weight_gemv")
                                        if c[1]["n"] == 6144],
                         ids=[c[0] for c in _entries("fp8_weight_gemv") + _entries("bf16_weight_gemv")
                              if c[1]["n"] == 6144])
@pytest.mark.parametrize("fp8_cache", [False, True])
@pytest.mark.parametrize("norm_in", [False, True])
def test_qkv_rotary_launch_shapes_compile(name, entry, fp8_cache, norm_in):
    """The QKV products' one-row shapes (Llama-3-8B's 6144 x 4096) ending in rotary and the cache's
    store (kernels/qkv_rotary_triton.py), as kernels/one_row.py launches them."""
    from meshlm.kernels import qkv_rotary_triton
    tiles = gemv_triton.GemvTiles(**entry["tiles"])
    fp8 = name.startswith("fp8")
    cache = "*fp8e4nv" if fp8_cache else "*bf16"
    types = dict(_pointer_types(fp8), q_out_ptr="*bf16", k_cache_ptr=cache, v_cache_ptr=cache, positions_ptr="*i64",
                 slot_mapping_ptr="*i64")
    ints = ("N", "K", "k_per_split", "stride_wn", "stride_cos", "stride_kc_block", "stride_kc_offset",
            "stride_kc_head", "stride_vc_block", "stride_vc_offset", "stride_vc_head", "num_heads", "num_kv_heads",
            "block_size", "num_partials")
    types.update({arg: "i32" for arg in ints})
    constexprs = dict(HEAD_DIM=128, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, IS_SPLIT=tiles.split_k > 1,
                      EVEN_K=entry["k"] % tiles.block_k == 0, SCALE=2 if fp8 else 0, HAS_BIAS=False,
                      IS_FP8=fp8_cache, PDL=True, PRELOAD=True, STAGES=tiles.num_stages, NORM_IN=norm_in,
                      BLOCK_P=512 if norm_in else 1)
    ptx = compile_sm90(qkv_rotary_triton._qkv_rotary_cache_kernel, types, constexprs, tiles.num_warps).asm["ptx"]
    assert "griddepcontrol.wait" in ptx and ("atom" in ptx) == (tiles.split_k > 1)
    assert ("cp.async" in ptx) == (tiles.num_stages > 1)
