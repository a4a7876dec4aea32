"""Rotary frequencies of the rope scaling types of Llama-family checkpoints.

``rope_scaling`` is the dict :class:`meshlm.weights.model_config.ModelConfig` keeps from
config.json (``rope_scaling`` or ``rope_parameters``), with ``rope_type`` set and, for llama3 and
yarn, ``original_max_position_embeddings`` filled in. Each type gives the inverse frequencies of
the head's dimension pairs and a factor by which cos and sin are multiplied (yarn's attention
factor; 1 elsewhere), with the formulas of transformers' rope initialisation.

``dynamic`` (NTK-aware) is static here, as in vLLM: transformers recomputes its base from the
longest position of every forward, which a paged cache of keys rotated at earlier steps cannot
follow; meshlm takes the base at the model's longest context, ``factor`` x
``max_position_embeddings``, where the two agree.
"""
from __future__ import annotations

import math

import torch

from meshlm.weights.model_config import SUPPORTED_ROPE_TYPES


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] fp32, factor on cos and sin) of one rope type."""
    kind = "default" if not scaling else scaling["rope_type"]
    if kind == "dynamic":
        factor = scaling["factor"]
        # transformers' base at seq_len = factor * max_position_embeddings
        theta = theta * (factor * factor - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, theta, scaling)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that turn fewer than ``beta_slow`` times over the original context are
    interpolated (divided by ``factor``), those that turn more than ``beta_fast`` times kept, a
    linear ramp between; cos and sin are scaled by the attention factor."""
    factor = scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(num_rotations: float) -> float:  # the dimension that turns num_rotations times
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of width zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # [head_dim / 2] weight of the original frequency
    inv_freq = inv_freq / factor * (1 - kept) + inv_freq * kept
    return inv_freq, _yarn_attention_factor(scaling)


def _yarn_attention_factor(scaling: dict) -> float:
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)
