"""float8 e4m3 conversions inside Triton kernels (the split-KV decode kernel over an fp8 KV pool):
float8 tiles widened to fp16 by moving bits, for 16-bit tensor cores, and a tile's rows quantized
to float8 with a scale each, for float8 tensor cores.

An e4m3 byte ``s eeee mmm`` placed in an fp16 as ``s 0eeee mmm0000000`` (sign, then the 4
exponent bits as the low bits of fp16's 5, then the 3 mantissa bits as fp16's top ones) is the
float8 value times 2^-8, exactly: fp16's exponent bias is 15, e4m3's 7, and e4m3's subnormals land
on fp16 subnormals (smallest 2^-9 * 2^-8 = 2^-17, above fp16's 2^-24). The caller folds the 2^8
into a scale it applies anyway. e4m3's NaN (``s 1111 111``, never stored: the cache clamps to
+-448) would read as +-480 * 2^-8.

Two forms of the same bit moves:
- :func:`e4m3_bits_to_f16`: plain Triton integer ops, one value at a time; runs anywhere,
  including Triton's CPU interpreter;
- :func:`e4m3_asm_to_f16`: four values a 32-bit register in inline PTX (byte permutes, a shift
  and a three-input logic op per pair), the GPU only. The conversion unit's
  ``cvt.rn.f16x2.e4m3x2`` widens two values an instruction but runs at a fraction of the integer
  units' rate; integer moves run beside it.
"""
from __future__ import annotations

import triton
import triton.language as tl

# What the bit moves leave out: value = widened * F16_WIDEN_FACTOR.
F16_WIDEN_FACTOR = tl.constexpr(256.0)

# Four float8 bytes [b3 b2 b1 b0] of $2 -> fp16 pairs $0 = (b0, b1), $1 = (b2, b3), each the
# float8 value times 2^-8. prmt places each byte in the high byte of a 16-bit half (low byte
# zero), so a half reads s eeee mmm 00000000; shifted right by one, its magnitude bits land on
# 0eeee mmm0000000 (the mask 0x3F80 drops the sign, which the shift moved to bit 14, and the bit
# the high half shifted into the low half's bit 15); lop3 (0xF8: a | (b & c)) puts the sign back.
_E4M3_TO_F16_X4 = tl.constexpr("""{
.reg .b32 zero, magnitude, lo, hi, slo, shi, mlo, mhi;
mov.b32 zero, 0;
mov.b32 magnitude, 0x3F803F80;
prmt.b32 lo, $2, zero, 0x1404;
prmt.b32 hi, $2, zero, 0x3424;
and.b32 slo, lo, 0x80008000;
and.b32 shi, hi, 0x80008000;
shr.b32 mlo, lo, 1;
shr.b32 mhi, hi, 1;
lop3.b32 $0, slo, mlo, magnitude, 0xF8;
lop3.b32 $1, shi, mhi, magnitude, 0xF8;
}""")


# One 32-bit word of four float8 e4m3 bytes (lowest first) -> four fp16, exact: the conversion
# unit's instruction on each 16-bit half in place.
_E4M3_WORD_TO_F16 = tl.constexpr("""{
.reg .b16 lo, hi;
.reg .b32 a, b;
mov.b32 {lo, hi}, $4;
cvt.rn.f16x2.e4m3x2 a, lo;
cvt.rn.f16x2.e4m3x2 b, hi;
mov.b32 {$0, $1}, a;
mov.b32 {$2, $3}, b;
}""")


@triton.jit
def e4m3_words_to_f16(words, IN_ASM: tl.constexpr):
    """[rows, cols] int32 words of four float8 e4m3 bytes each (lowest byte first, as in memory)
    -> [rows, 4 * cols] fp16, exact. A tile loaded as words stays four values a register until
    this widening, where a float8 tile may hold a byte a register. ``IN_ASM``: the conversion in
    PTX (the GPU only), else shifts and Triton's conversion."""
    if IN_ASM:
        e0, e1, e2, e3 = tl.inline_asm_elementwise(_E4M3_WORD_TO_F16, "=h,=h,=h,=h,r", [words],
                                                   dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                                   is_pure=True, pack=1)
    else:
        e0 = _word_byte_to_f16(words, 0)
        e1 = _word_byte_to_f16(words, 8)
        e2 = _word_byte_to_f16(words, 16)
        e3 = _word_byte_to_f16(words, 24)
    wide = tl.join(tl.join(e0, e2), tl.join(e1, e3))  # [rows, cols, 2, 2]: byte 2 * i + j at [..., i, j]
    return tl.reshape(wide, [words.shape[0], 4 * words.shape[1]])


@triton.jit
def _word_byte_to_f16(words, SHIFT: tl.constexpr):
    byte = ((words >> SHIFT) & 0xFF).to(tl.uint8)
    return byte.to(tl.float8e4nv, bitcast=True).to(tl.float16)


@triton.jit
def e4m3_bits_to_f16(x):
    """float8 e4m3 tensor ``x`` -> fp16 of the same shape, each value times 2^-8 (exact)."""
    byte = x.to(tl.uint8, bitcast=True).to(tl.uint16)
    half = ((byte & 0x80) << 8) | ((byte & 0x7F) << 7)
    return half.to(tl.float16, bitcast=True)


@triton.jit
def e4m3_asm_to_f16(x):
    """As :func:`e4m3_bits_to_f16`, four values at a time in PTX (the GPU only)."""
    return tl.inline_asm_elementwise(_E4M3_TO_F16_X4, "=r,=r,r", [x.to(tl.uint8, bitcast=True)],
                                     dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def widen_fp8(x, dtype: tl.constexpr, HOW: tl.constexpr):
    """float8 e4m3 tile ``x`` -> ``dtype``: ``HOW`` 0 exactly, by the conversion unit; 1 (Triton
    integer ops) or 2 (PTX) by moving bits, times 2^-8 (``F16_WIDEN_FACTOR`` restores it); 3 (PTX)
    or 4 (Triton ops): ``x`` is int32 words of four float8 (:func:`e4m3_words_to_f16`), exactly."""
    if HOW >= 3:
        wide = e4m3_words_to_f16(x, HOW == 3)
    elif HOW == 2:
        wide = e4m3_asm_to_f16(x)
    elif HOW == 1:
        wide = e4m3_bits_to_f16(x)
    else:
        wide = x.to(dtype)
    return wide.to(dtype)


@triton.jit
def quantize_rows_e4m3(q, PRE_ROUND: tl.constexpr):
    """[rows, HEAD_DIM] q -> (float8 e4m3 q / scale, the fp32 scale [rows, 1]): each row's largest
    magnitude maps to e4m3's largest, 448 (an all-zero row keeps scale 1). ``PRE_ROUND`` (the CPU
    interpreter, whose float8 conversion halves a value that rounds up to a power of two): round
    to e4m3's 4 significant bits in fp32 first (Veltkamp's split), so that the conversion is exact."""
    q = q.to(tl.float32)
    amax = tl.max(tl.abs(q), 1)[:, None]
    scale = tl.where(amax > 0.0, amax / 448.0, 1.0)
    q = q / scale
    if PRE_ROUND:
        split = q * 1048577.0  # 2^20 + 1: keeps 24 - 20 bits
        q = split - (split - q)
    return q.to(tl.float8e4nv), scale
