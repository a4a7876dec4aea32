"""The split-KV decode kernel's machine code for a GPU, without one: compiles variants of
:mod:`meshlm.kernels.decode_attention` for an sm_90 target (Triton's own ptxas, nvdisasm and
cuobjdump, shipped in its wheel) and counts the SASS instructions of the loop over unmasked key
tiles, per 64 keys of one KV head: what a tile costs the SM's four schedulers, whatever the
memory does. Over an fp8 pool the kernel is bound by that count, not by bytes.

    python3 benchmarks/decode_sass.py                       # fp8 pool, a set of variants
    python3 benchmarks/decode_sass.py --kv-cache-dtype auto
    python3 benchmarks/decode_sass.py --variant block_n=128,swap_ab=1,min_group_rows=8 --variant block_n=64

Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, block size 16); pointers and
strides aligned as a real launch specializes them. Columns: warp instructions per 64 keys (the
loop's instructions x warps x 64 / keys a tile), then by kind per warp and tile: integer
multiply-adds, shared-memory loads and stores, float8 conversions (F2FP), byte permutes, logic and
shifts, tensor-core products (HMMA: mma.sync, HGMMA: warpgroup MMA), global loads, local-memory
spills; registers a thread and shared memory a program. Needs Triton with its CUDA backend.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshlm.kernels.decode_attention import _decode_split_kernel  # noqa: E402
from meshlm.kernels.decode_tiles import DecodeTiles, decode_tiles  # noqa: E402

GROUP, KV_BLOCK_SIZE, HEAD_DIM, NUM_KV_HEADS = 4, 16, 128, 8
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# The kinds counted, by SASS opcode (without modifiers).
KINDS = {"IMAD": ("IMAD",), "LDS": ("LDS", "LDSM"), "STS": ("STS", "STSM"), "F2FP": ("F2FP",), "PRMT": ("PRMT",),
         "LOP3+SHF": ("LOP3", "SHF"), "HMMA": ("HMMA",), "HGMMA": ("HGMMA",), "LDG": ("LDG", "LDGSTS"),
         "spill": ("STL", "LDL")}


def compile_variant(tiles: DecodeTiles, kv_fp8: bool, capability: int):
    """The kernel compiled for ``tiles`` as :func:`paged_decode_attention` launches it for a bf16
    model (q in fp16 over an fp8 pool), one split, no window, with programmatic dependent launch
    (as on sm_90)."""
    kv = "fp8e4nv" if kv_fp8 else "bf16"
    q = "fp16" if kv_fp8 else "bf16"
    pointers = dict(out_ptr=q, q_ptr=q, k_cache_ptr=kv, v_cache_ptr=kv, block_tables_ptr="i32", seq_lens_ptr="i32")
    merge_rows = triton.next_power_of_2(GROUP * tiles.kv_heads_per_program)
    constexprs = dict(
        GROUP=GROUP, GROUP_ROWS=max(tiles.min_group_rows, merge_rows),
        BLOCK_N=tiles.block_n, KV_BLOCK_SIZE=KV_BLOCK_SIZE, HEAD_DIM=HEAD_DIM, IS_SPLIT=False, USE_WINDOW=False,
        DOT_PRECISION="tf32", DOT_IN_FP32=False, KV_FP8=kv_fp8, KV_FP8_AS_F16=kv_fp8,
        PREFETCH_TABLE=tiles.prefetch_table, K_TRANSPOSED=tiles.k_transposed, PAGED_TILE=tiles.paged_tile,
        HEADS_FIRST=tiles.heads_first, KV_HEADS=tiles.kv_heads_per_program, SPLITS_FIRST=tiles.splits_first,
        FUSED_MERGE=False, MERGE_ROWS=merge_rows, MERGE_CHUNK=1, MIN_SPLIT_TILES=tiles.min_split_tiles, PDL=True,
        **tiles.tile_switches(True))
    signature, attrs = {}, {}
    for index, param in enumerate(_decode_split_kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
        else:
            signature[name] = "fp32" if name == "qk_scale_log2" else "i32"
        if name.endswith("_ptr") or (name.startswith("stride_") and name not in _decode_split_kernel.do_not_specialize):
            attrs[(index,)] = [["tt.divisibility", 16]]  # as a launch over aligned tensors specializes them
    missing = {p.name for p in _decode_split_kernel.params if p.is_constexpr} - constexprs.keys()
    assert not missing, f"constexprs this tool does not set: {sorted(missing)}"
    source = ASTSource(_decode_split_kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))


def run_tool(tool: str, args: list[str], cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([str(_TOOLS / tool), *args, path], capture_output=True, text=True, check=True).stdout


def first_loop(sass: str) -> collections.Counter:
    """Opcodes (without modifiers) of the first loop in ``sass`` (nvdisasm text): from the label
    that the first backward branch jumps to, through that branch."""
    label_at, pending, instructions = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if instruction:
            address = int(instruction.group(1), 16)
            label_at.update((name, address) for name in pending)
            pending = []
            instructions.append((address, instruction.group(2), instruction.group(3)))
    for address, opcode, operands in instructions:
        target = re.search(r"`\(\.(L_x_\d+)\)", operands)
        if opcode.startswith("BRA") and target and label_at.get(target.group(1), address) < address:
            start = label_at[target.group(1)]
            return collections.Counter(op.split(".")[0] for a, op, _ in instructions if start <= a <= address)
    return collections.Counter()


def report(name: str, tiles: DecodeTiles, kv_fp8: bool, capability: int) -> None:
    try:
        kernel = compile_variant(tiles, kv_fp8, capability)
    except Exception as error:  # a variant that does not compile
        print(f"{name:<48} failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
        return
    loop = first_loop(run_tool("nvdisasm", ["-c"], kernel.asm["cubin"]))
    registers = re.search(r"REG:(\d+)", run_tool("cuobjdump", ["--dump-resource-usage"], kernel.asm["cubin"]))
    keys = tiles.block_n * tiles.kv_heads_per_program
    per_64_keys = sum(loop.values()) * tiles.num_warps * 64 / keys
    kinds = " ".join(f"{kind} {sum(loop[op] for op in ops):4d}" for kind, ops in KINDS.items())
    print(f"{name:<48} {per_64_keys:7.0f}  {kinds}  regs {registers.group(1) if registers else '?':>3} "
          f"smem {kernel.metadata.shared // 1024:3d} KB", flush=True)


def default_variants(kv_fp8: bool) -> dict[str, DecodeTiles]:
    """The defaults for few and many (sequence, KV head) programs, and the switches around them."""
    many = decode_tiles(sys.modules["torch"].bfloat16, 4096, 132, kv_fp8, NUM_KV_HEADS)
    few = decode_tiles(sys.modules["torch"].bfloat16, 64, 132, kv_fp8, NUM_KV_HEADS)
    plain = DecodeTiles(64, 4, 2, prefetch_table=1)
    swapped = dict(swap_ab=True, min_group_rows=8)
    variants = {"default, many programs": many, "default, few programs": few,
                "default, many programs, sum_at_end switched": dataclasses.replace(many, sum_at_end=not many.sum_at_end),
                "default, few programs, sum_at_end switched": dataclasses.replace(few, sum_at_end=not few.sum_at_end),
                "64 keys, prefetch 1": plain,
                "128 keys, prefetch 1": dataclasses.replace(plain, block_n=128),
                "64 keys, swap_ab": dataclasses.replace(plain, swap_ab=True),
                "64 keys, swap_ab, 8 rows": dataclasses.replace(plain, **swapped),
                "128 keys, swap_ab, 8 rows, prefetch 2": DecodeTiles(128, 4, 2, prefetch_table=2, **swapped),
                "2 KV heads x 64 keys, swap_ab, 8 rows": DecodeTiles(64, 4, 2, prefetch_table=2,
                                                                      kv_heads_per_program=2, **swapped),
                "256 keys, 8 warps, swap_ab, 8 rows": DecodeTiles(256, 8, 2, prefetch_table=2, **swapped)}
    if kv_fp8:
        for widen in ("asm", "asm_k", "bits", "words_v"):
            variants[f"64 keys, prefetch 1, widen {widen}"] = dataclasses.replace(plain, fp8_widen=widen)
        variants["128 keys, swap_ab, 8 rows, widen asm_k"] = DecodeTiles(128, 4, 2, prefetch_table=2,
                                                                         fp8_widen="asm_k", **swapped)
        variants["128 keys, swap_ab, 8 rows, words_v"] = DecodeTiles(128, 4, 2, prefetch_table=2,
                                                                     fp8_widen="words_v", **swapped)
        variants["128 keys, swap_ab, 8 rows, words, sum_at_end"] = DecodeTiles(128, 4, 2, prefetch_table=2,
                                                                               fp8_widen="words", sum_at_end=True,
                                                                               **swapped)
        variants["128 keys, swap_ab, 8 rows, fp8_qk"] = DecodeTiles(128, 4, 2, prefetch_table=2, fp8_qk=True,
                                                                    **swapped)
    return variants


def parse_variant(text: str) -> DecodeTiles:
    """'block_n=128,swap_ab=1,fp8_widen=asm' -> DecodeTiles (num_warps 4, num_stages 2 unless given)."""
    fields = {field.name: field.type for field in dataclasses.fields(DecodeTiles)}
    values = dict(num_warps=4, num_stages=2)
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        if key not in fields:
            raise SystemExit(f"--variant {text}: {key} is no DecodeTiles field ({', '.join(fields)})")
        values[key] = value if fields[key] == "str" else (value not in ("0", "false", "False")
                                                           if fields[key] == "bool" else int(value))
    return DecodeTiles(**values)


def main() -> None:
    import torch  # noqa: F401  (decode_tiles takes torch dtypes)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="fp8")
    parser.add_argument("--variant", action="append", default=[],
                        help="DecodeTiles fields, e.g. block_n=128,swap_ab=1 (repeatable; default: a set)")
    parser.add_argument("--capability", type=int, default=90, help="compute capability to compile for")
    args = parser.parse_args()
    kv_fp8 = args.kv_cache_dtype == "fp8"
    variants = ({text: parse_variant(text) for text in args.variant} if args.variant
                else default_variants(kv_fp8))
    print(f"sm_{args.capability}, {'fp8 e4m3' if kv_fp8 else 'bf16'} KV pool: warp instructions per 64 keys "
          "of the unmasked-tile loop, then per warp and tile by kind")
    for name, tiles in variants.items():
        report(name, tiles, kv_fp8, args.capability)


if __name__ == "__main__":
    main()
