"""Tensor-parallel layers. Each owns its sharding and cuts its slice from the checkpoint.

Shapes are per rank; a model built from these reads like single-GPU code. ``load`` takes a
CheckpointReader and the checkpoint names, and reads only this rank's rows or columns.
``expected_shapes`` gives the full checkpoint shapes for the up-front check.

With a QuantizationConfig (``quant``) the linear layers hold float8 weights with one scale per
output row (parallel/fp8_weights.py reads them, kernels/fp8.py multiplies); embeddings, norms and
the LM head keep the model dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.parallel.comm import Communicator
from meshlm.parallel.fp8_weights import read_fp8, read_input_scale, read_unquantized
from meshlm.weights.checkpoint import CheckpointReader
from meshlm.weights.quantization import QuantizationConfig
from meshlm.kernels.fp8 import FP8_DTYPE, QuantizedRows, linear, silu_and_mul_linear, takes_quantized_rows
from meshlm.kernels.one_row import SummedRow, one_row_add_norm, one_row_qkv_rotary_cache, one_row_silu_and_mul
from meshlm.kernels.fused_ops import TORCH_OPS


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tp={denominator}")
    return numerator // denominator


def valid_tp_sizes(num_heads: int, num_kv_heads: int, limit: int = 64) -> list[int]:
    """TP degrees that split attention into whole heads (KV heads replicated when tp > kv)."""
    return [tp for tp in range(1, limit + 1)
            if num_heads % tp == 0 and (num_kv_heads % tp == 0 or tp % num_kv_heads == 0)]


def check_tp_for_heads(num_heads: int, num_kv_heads: int, tp: int) -> None:
    if tp in valid_tp_sizes(num_heads, num_kv_heads, limit=max(tp, 64)):
        return
    if num_heads % tp:
        why = f"num_heads={num_heads} is not divisible by tp={tp}"
    else:
        why = (f"num_kv_heads={num_kv_heads} and tp={tp}: neither divides the other, so KV heads "
               f"can be neither split nor replicated whole")
    raise ValueError(f"tensor parallel size {tp} does not fit this model: {why}; "
                     f"tp values that work: {valid_tp_sizes(num_heads, num_kv_heads)}")


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class QuantizableLinear(nn.Module):
    """``weight`` [out, in] in the model dtype, or float8 with ``weight_scale`` [out] (float32) and,
    for a checkpoint with static activation scales, ``input_scale`` [1]."""

    def _make_weight(self, out: int, in_features: int, dtype, device, quant: QuantizationConfig | None) -> None:
        self.quant = quant
        self.weight_scale = self.input_scale = None
        if quant is None:
            self.weight = _param((out, in_features), dtype, device)
            return
        self.weight = _param((out, in_features), FP8_DTYPE, device)
        self.weight_scale = _param((out,), torch.float32, device)
        if quant.is_static_input:
            self.input_scale = _param((1,), torch.float32, device)

    def matmul(self, x: torch.Tensor | QuantizedRows, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x W^T + b`` on this rank's shard, with no communication."""
        return linear(x, self.weight, self.weight_scale, bias, self.input_scale)

    def takes_quantized_rows(self, num_rows: int) -> bool:
        """Whether ``forward`` may be given ``num_rows`` rows already quantized per row (kernels/fp8.py).
        They are the rows this rank multiplies: for a row-parallel layer its shard of each row, so the
        scales are those of the shard, as when the layer quantizes them itself."""
        return takes_quantized_rows(num_rows, self.weight_scale, self.input_scale)

    def _scale_shapes(self, names: list[str], shapes: dict) -> dict:
        if self.quant is None:
            return {}
        found = {}
        for name in names:
            found.update(self.quant.scale_shapes(name, shapes[name]))
        return found

    def _load_input_scale(self, reader, names: list[str]) -> None:
        if self.input_scale is None:
            return
        self.input_scale.copy_(read_input_scale(reader, self.quant, names))


class ColumnParallelLinear(QuantizableLinear):
    """``y = x W^T + b`` with W's output rows split across TP ranks; y stays sharded.

    ``output_sizes`` lists merged sub-matrices (e.g. gate and up), each split on its own so
    that every rank holds the same part of each.
    """

    def __init__(self, in_features: int, output_sizes: list[int], tp: Communicator, bias: bool,
                 dtype: torch.dtype, device=None, quant: QuantizationConfig | None = None):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.output_sizes = output_sizes
        self.sizes_per_rank = [divide(n, tp.size, "output size") for n in output_sizes]
        out = sum(self.sizes_per_rank)
        self._make_weight(out, in_features, dtype, device, quant)
        self.bias = _param((out,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def forward_gated_one_row(self, x: torch.Tensor | QuantizedRows | SummedRow) -> torch.Tensor | None:
        """``silu(gate) * up`` of a gate/up projection (two equal sub-matrices, no bias) from one
        kernel where a single row runs the one-row product (kernels/one_row.py; a SummedRow's norm
        inside it); else None (the caller runs ``forward``, then SiLU-and-mul)."""
        if isinstance(x, QuantizedRows) or self.bias is not None or len(set(self.sizes_per_rank)) != 1 \
                or len(self.sizes_per_rank) != 2:
            return None
        return one_row_silu_and_mul(x, self.weight, self.weight_scale)

    def _rows(self, index: int) -> tuple[int, int, int]:
        """(checkpoint start row, rows, offset in this rank's weight) of sub-matrix ``index``."""
        n = self.sizes_per_rank[index]
        return self.tp.rank * n, n, sum(self.sizes_per_rank[:index])

    def expected_shapes(self, names: list[str], bias_names: list[str] | None = None) -> dict:
        shapes = {name: (size, self.in_features) for name, size in zip(names, self.output_sizes)}
        shapes.update(self._scale_shapes(names, shapes))
        if self.bias is not None and bias_names:
            shapes.update({b: (size,) for b, size in zip(bias_names, self.output_sizes)})
        return shapes

    @torch.no_grad()
    def load(self, reader: CheckpointReader, names: list[str], bias_names: list[str] | None = None) -> None:
        for i, name in enumerate(names):
            start, n, offset = self._rows(i)
            if self.quant is None:
                self.weight[offset:offset + n].copy_(read_unquantized(reader, name, 0, start, start + n))
            else:
                weight, scale = read_fp8(reader, self.quant, name, 0, start, start + n, self.weight.device)
                self.weight[offset:offset + n].copy_(weight)
                self.weight_scale[offset:offset + n].copy_(scale)
            if self.bias is not None and bias_names:
                self.bias[offset:offset + n].copy_(reader.read(bias_names[i], 0, start, start + n))
        self._load_input_scale(reader, names)


class QKVParallelLinear(ColumnParallelLinear):
    """Merged Q, K, V projections split by whole heads.

    When tp > num_kv_heads, each KV head is replicated on tp / num_kv_heads ranks, so that
    every rank holds the KV head its query heads attend to.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 tp: Communicator, bias: bool, dtype: torch.dtype, device=None,
                 quant: QuantizationConfig | None = None):
        check_tp_for_heads(num_heads, num_kv_heads, tp.size)
        nn.Module.__init__(self)
        self.tp = tp
        self.in_features = hidden_size
        self.head_dim = head_dim
        self.num_heads_per_rank = num_heads // tp.size
        self.num_kv_heads_per_rank = max(1, num_kv_heads // tp.size)
        self.output_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.sizes_per_rank = [self.num_heads_per_rank * head_dim,
                               self.num_kv_heads_per_rank * head_dim,
                               self.num_kv_heads_per_rank * head_dim]
        out = sum(self.sizes_per_rank)
        self._make_weight(out, hidden_size, dtype, device, quant)
        self.bias = _param((out,), dtype, device) if bias else None
        self._replicas = max(1, tp.size // num_kv_heads)  # ranks sharing one KV head

    def forward_rotary_cache(self, x: torch.Tensor | QuantizedRows | SummedRow, rotary, positions: torch.Tensor,
                             slot_mapping: torch.Tensor, kv_cache: tuple, k_scale: torch.Tensor | None,
                             v_scale: torch.Tensor | None) -> torch.Tensor | None:
        """The query heads rotated by ``rotary`` (kernels/attention.py's RotaryEmbedding)
        [1, heads_per_rank, head_dim], the rotated keys and the values stored in ``kv_cache``, from
        one kernel where a single row runs the one-row product (kernels/one_row.py; a SummedRow's
        norm inside it); else None (the caller runs ``forward``, then ``rotary.rotate_and_cache``)."""
        if isinstance(x, QuantizedRows):
            return None
        return one_row_qkv_rotary_cache(x, self.weight, self.weight_scale, self.bias, self.num_heads_per_rank,
                                        self.num_kv_heads_per_rank, self.head_dim, rotary.cos, rotary.sin, positions,
                                        slot_mapping, kv_cache, k_scale, v_scale)

    def _rows(self, index: int) -> tuple[int, int, int]:
        n = self.sizes_per_rank[index]
        offset = sum(self.sizes_per_rank[:index])
        if index == 0:
            return self.tp.rank * n, n, offset
        kv_shard = self.tp.rank // self._replicas
        return kv_shard * n, n, offset


class RowParallelLinear(QuantizableLinear):
    """``y = x W^T + b`` with W's input columns split; partial sums are all-reduced over TP."""

    def __init__(self, in_features: int, out_features: int, tp: Communicator, bias: bool,
                 dtype: torch.dtype, device=None, quant: QuantizationConfig | None = None):
        super().__init__()
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = divide(in_features, tp.size, "input size")
        self._make_weight(out_features, self.in_per_rank, dtype, device, quant)
        self.bias = _param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor | QuantizedRows) -> torch.Tensor:
        return self._reduce(self.matmul(x))

    def forward_add_norm(self, x: torch.Tensor | QuantizedRows, residual: torch.Tensor,
                         norm: RMSNorm) -> SummedRow | None:
        """``forward(x) + residual`` with the RMSNorm ``norm`` after it left to the next product, as a
        SummedRow (kernels/one_row.py), where one kernel does both: one rank (no all-reduce between
        the product and the add), no bias, a single row that runs the one-row product; else None."""
        if self.tp.size != 1 or self.bias is not None or isinstance(x, QuantizedRows):
            return None
        return one_row_add_norm(x, self.weight, self.weight_scale, residual, norm)

    def forward_silu_and_mul(self, gate_up: torch.Tensor, silu_and_mul) -> torch.Tensor:
        """``forward(silu_and_mul(gate_up))``, the SiLU inside the product's kernel where a small
        batch runs it (kernels/fp8.py's silu_and_mul_linear)."""
        y = silu_and_mul_linear(gate_up, self.weight, self.weight_scale)
        return self.forward(silu_and_mul(gate_up)) if y is None else self._reduce(y)

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def expected_shapes(self, name: str, bias_name: str | None = None) -> dict:
        shapes = {name: (self.out_features, self.in_features)}
        shapes.update(self._scale_shapes([name], shapes))
        if self.bias is not None and bias_name:
            shapes[bias_name] = (self.out_features,)
        return shapes

    @torch.no_grad()
    def load(self, reader: CheckpointReader, name: str, bias_name: str | None = None) -> None:
        start = self.tp.rank * self.in_per_rank
        if self.quant is None:
            self.weight.copy_(read_unquantized(reader, name, 1, start, start + self.in_per_rank))
        else:  # the scales of whole rows: replicated on every rank of the group
            weight, scale = read_fp8(reader, self.quant, name, 1, start, start + self.in_per_rank,
                                     self.weight.device)
            self.weight.copy_(weight)
            self.weight_scale.copy_(scale)
        self._load_input_scale(reader, [name])
        if self.bias is not None and bias_name:
            self.bias.copy_(reader.read(bias_name))


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across TP ranks (the vocabulary padded up to a multiple of tp).

    Each rank embeds the tokens it owns, zeros the rest, and the all-reduce completes the rows.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: Communicator, dtype: torch.dtype, device=None):
        super().__init__()
        self.tp = tp
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.vocab_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.vocab_per_rank
        self.weight = _param((self.vocab_per_rank, hidden_size), dtype, device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [num_tokens, hidden]
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def expected_shapes(self, name: str) -> dict:
        return {name: (self.vocab_size, self.hidden_size)}

    @torch.no_grad()
    def load(self, reader: CheckpointReader, name: str) -> None:
        stop = min(self.vocab_start + self.vocab_per_rank, self.vocab_size)
        rows = max(0, stop - self.vocab_start)
        self.weight.zero_()
        if rows:
            self.weight[:rows].copy_(reader.read(name, 0, self.vocab_start, stop))


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-sharded output projection; ``forward`` returns this rank's logits shard.

    Use ParallelGroups.gather_logits_to_sampler to assemble the full vocabulary. With tied
    embeddings it shares the embedding's weight (same sharding).
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: Communicator, dtype: torch.dtype,
                 device=None, tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden_size, tp, dtype, device)
        if tied_to is not None:
            self.weight = tied_to.weight

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[num_rows, vocab_per_rank], into ``out`` (of that shape and the weight's dtype) if given."""
        if out is None:
            return F.linear(hidden, self.weight)
        return torch.matmul(hidden, self.weight.t(), out=out)


class RMSNorm(nn.Module):
    """``weight * rmsnorm(x)`` over the last dim, normalised in fp32 and cast back before the weight
    (as transformers does). ``ops`` runs the math: the torch ops, or fused kernels (runtime/fused_ops.py)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.eps = eps
        self.weight = _param((size,), dtype, device)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor | SummedRow, residual: torch.Tensor | None,
                 quantize: bool = False) -> tuple[torch.Tensor | QuantizedRows | SummedRow, torch.Tensor]:
        """(the norm of ``x + residual``, ``x + residual``); a ``None`` residual adds nothing.
        ``quantize``: the norm comes quantized per row to float8, for an FP8 layer that takes it so.
        A SummedRow of this norm (the product before added the residual) comes back as it is, the
        norm left to the product after (kernels/one_row.py), with its sum as the stream."""
        if isinstance(x, SummedRow):
            assert residual is None and x.norm is self, "a SummedRow is the whole stream, made for this norm"
            if quantize:
                return self.ops.add_rms_norm_quantized(x.row, None, self.weight, self.eps)
            return x, x.row
        if quantize:
            return self.ops.add_rms_norm_quantized(x, residual, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def expected_shapes(self, name: str) -> dict:
        return {name: tuple(self.weight.shape)}

    @torch.no_grad()
    def load(self, reader: CheckpointReader, name: str) -> None:
        self.weight.copy_(reader.read(name))
