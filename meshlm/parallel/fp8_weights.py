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
"""
from __future__ import annotations

import torch

from meshlm.kernels.fp8 import FP8_DTYPE, dequantize, quantize_per_row
from meshlm.weights.checkpoint import CheckpointError
from meshlm.weights.quantization import QuantizationConfig


def read_fp8(reader, quant: QuantizationConfig, name: str, dim: int | None = None, start: int = 0,
             stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice ``[start:stop]`` along ``dim`` (0: rows, 1: columns, None: all) of the 2-D weight ``name``
    -> (float8 [rows, columns], float32 [rows]), each row scaled over its full width."""
    rows = reader.read(name, 0, start, stop) if dim == 0 else reader.read(name)  # [n, K]: whole rows
    first_row = start if dim == 0 else 0
    if not quant.is_prequantized(name):
        q, scale = quantize_per_row(rows)
    else:
        q, scale = _prequantized_rows(reader, quant, name, rows, first_row, first_row + rows.shape[0])
    if dim == 1:
        q = q[:, start:stop]
    return q.contiguous(), scale.view(-1)


def _prequantized_rows(reader, quant: QuantizationConfig, name: str, rows: torch.Tensor, start: int,
                       stop: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    return quantize_per_row(dequantize(rows, per_element))


def read_input_scale(reader, quant: QuantizationConfig, names: list[str]) -> torch.Tensor | None:
    """The static activation scale of a layer merged from ``names`` (the largest of theirs, so no
    part's activations saturate), or None: quantize each token's row on the fly."""
    if not quant.is_static_input or not all(quant.is_prequantized(n) for n in names):
        return None
    return torch.stack([reader.read(quant.input_scale_name(n)).float().reshape(()) for n in names]).amax().reshape(1)


def check_fp8_support(quant: QuantizationConfig, name: str) -> None:
    """A fused expert tensor (transformers' in-memory form) is read from high precision only."""
    if quant.is_prequantized(name):
        raise CheckpointError(f"tensor {name!r}: float8 checkpoints with fused expert tensors are not "
                              f"supported; store one tensor per expert")
