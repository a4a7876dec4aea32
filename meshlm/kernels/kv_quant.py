"""The FP8 KV cache's arithmetic, with vLLM's semantics.

A key (value) ``x`` of KV head ``h`` is stored as ``clamp(x / k_scale[h], -448, 448)`` in float8
e4m3 (``torch.float8_e4m3fn``, 1 byte) and read back as ``stored * k_scale[h]`` in fp32. The
scales are fp32 ``[num_kv_heads_per_rank]`` per layer, one for keys and one for values: a
per-tensor scale is every head's. They are 1.0 unless the checkpoint carries them
(parallel/kv_scales.py). A pool in the model's dtype ignores them.

The torch write path here is the reference and the CPU's; the fused rotary-and-cache kernel
(kernels/fused_ops.py) quantizes the same way, and every attention path dequantizes inside.
"""
from __future__ import annotations

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = float(torch.finfo(FP8_KV_DTYPE).max)  # 448: e4m3fn has no infinity, beyond this is NaN


def resolve_kv_cache_dtype(cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The KV pool's element type for ``kv_cache_dtype``: "auto" the model's ``dtype``, "fp8" and
    "fp8_e4m3" float8 e4m3."""
    if cache_dtype == "auto":
        return dtype
    if cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"kv_cache_dtype={cache_dtype!r}; choose auto, fp8 or fp8_e4m3")


def kv_cache_itemsize(cache_dtype: str, itemsize: int) -> int:
    """Bytes of one KV element for ``kv_cache_dtype``, a model of ``itemsize`` bytes per element."""
    return itemsize if cache_dtype == "auto" else resolve_kv_cache_dtype(cache_dtype, torch.float32).itemsize


def is_fp8_kv(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def fp8_kv_as_f16(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the attention kernels compute a bf16 model's products over an fp8 pool in fp16:
    the GPU converts float8 to fp16 in one instruction per pair of values but to bf16 in several,
    which bound the kernels. fp16 keeps three more mantissa bits than bf16; its range (65504) is
    far above the rotated queries' and the probabilities'. Off the GPU (the interpreter computes
    in fp32) and for other dtypes: False."""
    return is_fp8_kv(cache) and q.dtype == torch.bfloat16 and q.is_cuda


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [num_tokens, num_kv_heads, head_dim] -> float8 e4m3 of the same shape, divided by
    ``scale`` [num_kv_heads] and clamped to the format's range."""
    scaled = x.float() / scale[:, None]  # [num_tokens, num_kv_heads, head_dim]
    return scaled.clamp(-FP8_KV_MAX, FP8_KV_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(stored: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``stored`` [..., num_kv_heads, head_dim] float8 -> fp32 times ``scale`` [num_kv_heads]."""
    return stored.float() * scale[:, None]


def kernel_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None,
                  v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale tensors a Triton kernel takes for this pool: the layer's for an fp8 pool (which
    needs them), else the cache itself as a pointer the kernel never reads."""
    if not is_fp8_kv(k_cache):
        return k_cache, k_cache
    assert k_scale is not None and v_scale is not None, "an fp8 KV cache needs k_scale and v_scale"
    assert k_scale.shape == v_scale.shape == (k_cache.shape[2],), (k_scale.shape, v_scale.shape, k_cache.shape)
    return k_scale, v_scale
