"""Reading a linear layer's shard as float8 rows with one float32 scale per output row.

Whatever the checkpoint holds, a layer keeps ``weight`` float8 [N_shard, K_shard] and ``weight_scale``
[N_shard]. Each row's scale covers the whole row of the full matrix, so a row-parallel shard (a
slice of columns) has the scales a single rank would have, and every layout computes with the
same numbers:

- high-precision weights (quantized at load): the rows are read whole, quantized, then cut;
- per-channel scales: read with their rows (column-parallel) or whole (row-parallel);
- per-tensor scales: broadcast to every row, exactly (merged Q/K/V or gate/up keep each part's own
  scale, so nothing is requantized);
- block scales: the rows are read whole, dequantized by their blocks and requantized per row.

Quantizing a row (at load, or requantizing blocks) picks its scale by search, not from its largest
magnitude alone. The e4m3 grid repeats at every power of two, so the scales
``amax / 448 * 2 ** (k / SCALE_CANDIDATES)``, k = 0 .. SCALE_CANDIDATES - 1, place the row on every
alignment to the grid that an octave offers, none of them saturating; each row keeps the one whose
rounding leaves the smallest squared error (k = 0, absmax scaling, on a tie). The search runs where
the layer lives (the GPU of a GPU run), once, at load.
"""
from __future__ import annotations

import torch

from meshlm.kernels.fp8 import FP8_DTYPE, FP8_MAX, MIN_SCALE, dequantize, quantize_with_scale
from meshlm.weights.checkpoint import CheckpointError
from meshlm.weights.quantization import QuantizationConfig


# Scales tried per row when quantizing weights; 1 would be plain absmax scaling.
SCALE_CANDIDATES = 16


def quantize_weight_rows(rows: torch.Tensor, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` [..., K] -> (float8 [..., K], float32 scales [..., 1]) on ``device`` (default: where
    ``rows`` are), each row with the candidate scale of least squared rounding error."""
    rows = rows.to(device=device, dtype=torch.float32)
    amax = rows.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    best_scale = best_error = None
    for factor in _candidate_factors():
        scale = (amax * factor).clamp(min=MIN_SCALE)
        # float64 sums: the choice does not hang on the order a device adds in
        error = (dequantize(quantize_with_scale(rows, scale), scale) - rows).double().square().sum(-1, keepdim=True)
        if best_scale is None:
            best_scale, best_error = scale, error
            continue
        is_better = error < best_error
        best_scale = torch.where(is_better, scale, best_scale)
        best_error = torch.where(is_better, error, best_error)
    return quantize_with_scale(rows, best_scale), best_scale


def _candidate_factors() -> list[float]:
    """``2 ** (k / SCALE_CANDIDATES) / FP8_MAX`` rounded to float32: one float32 multiplication then
    gives every device the same scale (CUDA divides by a number as a multiplication by its inverse,
    the CPU does not)."""
    return torch.tensor([2.0 ** (k / SCALE_CANDIDATES) / FP8_MAX for k in range(SCALE_CANDIDATES)]).tolist()


def read_fp8(reader, quant: QuantizationConfig, name: str, dim: int | None = None, start: int = 0,
             stop: int | None = None, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice ``[start:stop]`` along ``dim`` (0: rows, 1: columns, None: all) of the 2-D weight ``name``
    -> (float8 [rows, columns], float32 [rows]), each row scaled over its full width. Rows quantized
    here are quantized on ``device`` (the layer's)."""
    rows = reader.read(name, 0, start, stop) if dim == 0 else reader.read(name)  # [n, K]: whole rows
    first_row = start if dim == 0 else 0
    if not quant.is_prequantized(name):
        q, scale = quantize_weight_rows(rows, device)
    else:
        q, scale = _prequantized_rows(reader, quant, name, rows, first_row, first_row + rows.shape[0], device)
    if dim == 1:
        q = q[:, start:stop]
    return q.contiguous(), scale.view(-1)


def _prequantized_rows(reader, quant: QuantizationConfig, name: str, rows: torch.Tensor, start: int,
                       stop: int, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[start, stop)`` of a float8 checkpoint weight -> (float8 rows, scales [n, 1])."""
    if rows.dtype != FP8_DTYPE:
        raise CheckpointError(f"tensor {name!r} has dtype {rows.dtype}; the checkpoint's quantization_config "
                              f"declares it float8 e4m3 ({FP8_DTYPE})")
    scales = reader.read(quant.scale_name(name)).float()
    num_rows = rows.shape[0]
    if quant.weight_strategy == "tensor":
        return rows, scales.reshape(1, 1).expand(num_rows, 1).contiguous()
    if quant.weight_strategy == "channel":
        return rows, scales.reshape(-1, 1)[start:stop]
    bn, bk = quant.weight_block_size
    row_blocks = torch.arange(start, stop) // bn  # [n]
    col_blocks = torch.arange(rows.shape[1]) // bk  # [K]
    per_element = scales[row_blocks][:, col_blocks]  # [n, K]
    return quantize_weight_rows(dequantize(rows, per_element), device)


def read_input_scale(reader, quant: QuantizationConfig, names: list[str]) -> torch.Tensor | None:
    """The static activation scale of a layer merged from ``names`` (the largest of theirs, so no
    part's activations saturate), or None: quantize each token's row on the fly."""
    if not quant.is_static_input:
        return None
    return torch.stack([reader.read(quant.input_scale_name(n)).float().reshape(()) for n in names]).amax().reshape(1)


def read_unquantized(reader, name: str, dim: int | None = None, start: int = 0,
                     stop: int | None = None) -> torch.Tensor:
    """``reader.read`` for the weight of a layer that keeps the model dtype; a float8 tensor there (a
    layer the quantization_config lists as not quantized, stored quantized all the same) fails by name."""
    weight = reader.read(name) if dim is None else reader.read(name, dim, start, stop)
    if weight.dtype == FP8_DTYPE:
        raise CheckpointError(f"tensor {name!r} is float8 e4m3 in the checkpoint, and its layer is not quantized "
                              f"(the model's quantization_config lists it as not quantized, or there is none); "
                              f"a float8 weight needs its layer quantized")
    return weight


def check_fp8_support(quant: QuantizationConfig, name: str) -> None:
    """A fused expert tensor (transformers' in-memory form) is read from high precision only."""
    if quant.is_prequantized(name):
        raise CheckpointError(f"tensor {name!r}: float8 checkpoints with fused expert tensors are not "
                              f"supported; store one tensor per expert")
