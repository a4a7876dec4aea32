"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) over the tensor-parallel layers.

Sizes below are per rank. One pipeline stage holds a contiguous range of layers, keyed by their
global index so checkpoint names never depend on the pipeline degree; the first stage also
holds the embedding, the last the final norm and the LM head.
"""
from __future__ import annotations

import torch
from torch import nn

from meshlm.models.named_weights import NamedWeights
from meshlm.parallel.groups import ParallelGroups
from meshlm.parallel.kv_scales import KVCacheScales
from meshlm.parallel.layers import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                                    RowParallelLinear, VocabParallelEmbedding)
from meshlm.kernels.attention import AttentionMetadata, RotaryEmbedding, paged_attention_reference
from meshlm.weights.checkpoint import CheckpointReader
from meshlm.weights.model_config import ModelConfig
from meshlm.kernels.fp8 import QuantizedRows
from meshlm.kernels.one_row import SummedRow
from meshlm.kernels.fused_ops import TORCH_OPS, TorchOps

AttentionFn = type(paged_attention_reference)


def attention_modules(prefix: str) -> tuple[list[str], str]:
    """Checkpoint modules of decoder layer ``prefix``'s attention: ([Q, K, V], output projection)."""
    p = f"{prefix}.self_attn"
    return [f"{p}.{x}_proj" for x in "qkv"], f"{p}.o_proj"


def mlp_modules(prefix: str) -> tuple[list[str], str]:
    """Checkpoint modules of an MLP block ``prefix`` (``model.layers.N.mlp``): ([gate, up], down)."""
    return [f"{prefix}.gate_proj", f"{prefix}.up_proj"], f"{prefix}.down_proj"


class LlamaAttention(NamedWeights, nn.Module):
    """``prefix``: the decoder layer's checkpoint name (``model.layers.N``), which decides what the
    quantization_config quantizes."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, rotary: RotaryEmbedding,
                 attention_fn, dtype: torch.dtype, device, prefix: str):
        super().__init__()
        tp = groups.tp
        qkv, o = attention_modules(prefix)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, tp,
                                          cfg.attention_bias, dtype, device, quant=cfg.layer_quantization(qkv))
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp, False, dtype, device,
                                        quant=cfg.layer_quantization([o]))
        self.num_heads_per_rank = self.qkv_proj.num_heads_per_rank
        self.num_kv_heads_per_rank = self.qkv_proj.num_kv_heads_per_rank
        self.head_dim = cfg.head_dim
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.rotary = rotary
        self.attention_fn = attention_fn
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        self.kv_scales = KVCacheScales(cfg.num_kv_heads, tp, device)  # read by an fp8 KV cache only

    def takes_quantized_rows(self, num_tokens: int) -> bool:
        """Whether ``forward`` may be given its input quantized (the qkv projection's choice)."""
        return self.qkv_proj.takes_quantized_rows(num_tokens)

    def takes_summed_row(self) -> bool:
        """Whether the QKV product may take the norm before it (a SummedRow, kernels/one_row.py):
        not with a norm on q and k, whose QKV product keeps its rotary kernel."""
        return self.q_norm is None

    def forward(self, hidden: torch.Tensor | QuantizedRows | SummedRow, meta: AttentionMetadata,
                kv_cache: tuple) -> torch.Tensor:
        return self.o_proj(self._attention(hidden, meta, kv_cache))

    def forward_add(self, hidden: torch.Tensor | QuantizedRows | SummedRow, meta: AttentionMetadata, kv_cache: tuple,
                    residual: torch.Tensor, next_norm: RMSNorm | None) -> tuple[torch.Tensor | SummedRow,
                                                                                torch.Tensor | None]:
        """The residual stream after this block as (block output, ``residual``), or (a SummedRow, None)
        where the output projection adds the residual itself and leaves ``next_norm`` (None: the
        block after does not take it) to the product after it (kernels/one_row.py: one row, the
        fused kernels on)."""
        out = self._attention(hidden, meta, kv_cache)
        if next_norm is not None and self.rotary.ops.name == "triton":
            summed = self.o_proj.forward_add_norm(out, residual, next_norm)
            if summed is not None:
                return summed, None
        return self.o_proj(out), residual

    def _attention(self, hidden: torch.Tensor | QuantizedRows | SummedRow, meta: AttentionMetadata,
                   kv_cache: tuple) -> torch.Tensor:
        """Attention's output before the output projection: [num_tokens, num_heads_per_rank * head_dim]."""
        k_scale, v_scale = self.kv_scales.k_scale, self.kv_scales.v_scale
        # one row on a GPU with the fused kernels on: the QKV product rotates and stores in its own kernel
        if self.q_norm is None and self.rotary.ops.name == "triton":
            q = self.qkv_proj.forward_rotary_cache(hidden, self.rotary, meta.positions, meta.slot_mapping, kv_cache,
                                                   k_scale, v_scale)
            if q is not None:
                return self._attend(q, meta, kv_cache, k_scale, v_scale, None)
        if isinstance(hidden, SummedRow):
            hidden = hidden.normed()
        qkv = self.qkv_proj(hidden)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim per rank]
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_proj.sizes_per_rank, dim=-1)
        q = q.view(num_tokens, self.num_heads_per_rank, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads_per_rank, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads_per_rank, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # A step with prompt tokens also keeps its rotated keys apart, so that the prefill kernel can
        # read the step's own keys and values from them rather than gather them back from the cache.
        # [num_tokens, num_kv_heads_per_rank, head_dim]; v stays the QKV output's view.
        k_rotated = torch.empty(k.shape, dtype=k.dtype, device=k.device) if meta.max_query_len > 1 else None
        q = self.rotary.rotate_and_cache(meta.positions, q, k, v, kv_cache, meta.slot_mapping, k_scale, v_scale,
                                         k_rotated)
        return self._attend(q, meta, kv_cache, k_scale, v_scale, None if k_rotated is None else (k_rotated, v))

    def _attend(self, q: torch.Tensor, meta: AttentionMetadata, kv_cache: tuple, k_scale, v_scale,
                new_kv: tuple | None) -> torch.Tensor:
        """Attention of the rotated ``q`` [num_tokens, heads, head_dim] over the cache."""
        k_cache, v_cache = kv_cache
        out = self.attention_fn(q, k_cache, v_cache, meta, self.scale, self.sliding_window, k_scale, v_scale, new_kv)
        return out.view(q.shape[0], self.num_heads_per_rank * self.head_dim)

    def weight_names(self, prefix: str) -> list[tuple[object, tuple]]:
        p = f"{prefix}.self_attn"
        qkv, o = attention_modules(prefix)
        weights = [f"{m}.weight" for m in qkv]
        biases = [f"{m}.bias" for m in qkv] if self.qkv_proj.bias is not None else None
        names = [(self.qkv_proj, (weights, biases)), (self.o_proj, (f"{o}.weight",)),
                 (self.kv_scales, (prefix,))]
        if self.q_norm is not None:
            names += [(self.q_norm, (f"{p}.q_norm.weight",)), (self.k_norm, (f"{p}.k_norm.weight",))]
        return names


class LlamaMLP(NamedWeights, nn.Module):
    """``prefix``: the decoder layer's checkpoint name (``model.layers.N``)."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, device, prefix: str):
        super().__init__()
        inter = cfg.intermediate_size
        gate_up, down = mlp_modules(f"{prefix}.mlp")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [inter, inter], groups.tp, False, dtype, device,
                                                 quant=cfg.layer_quantization(gate_up))
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, groups.tp, False, dtype, device,
                                           quant=cfg.layer_quantization([down]))
        self.ops = TORCH_OPS

    def takes_quantized_rows(self, num_tokens: int) -> bool:
        """Whether ``forward`` may be given its input quantized (the gate/up projection's choice)."""
        return self.gate_up_proj.takes_quantized_rows(num_tokens)

    def forward(self, x: torch.Tensor | QuantizedRows | SummedRow) -> torch.Tensor:
        gated = self._gated_one_row(x)
        if gated is not None:
            return self.down_proj(gated)
        if isinstance(x, SummedRow):
            x = x.normed()
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * inter_per_rank]
        if self.down_proj.takes_quantized_rows(gate_up.shape[0]):
            return self.down_proj(self.ops.silu_and_mul_quantized(gate_up))
        return self.down_proj.forward_silu_and_mul(gate_up, self.ops.silu_and_mul)

    def takes_summed_row(self) -> bool:
        """Whether the gate/up product may take the norm before it (a SummedRow, kernels/one_row.py)."""
        return True

    def forward_add(self, x: torch.Tensor | QuantizedRows | SummedRow, residual: torch.Tensor | None,
                    next_norm: RMSNorm | None) -> tuple[torch.Tensor | SummedRow, torch.Tensor | None]:
        """The residual stream after this block as (block output, ``residual``), or (a SummedRow,
        None) where the down projection adds the residual itself and leaves ``next_norm`` (None: the
        stage's last layer, or a layer after that does not take it) to the product after it
        (kernels/one_row.py)."""
        gated = self._gated_one_row(x) if next_norm is not None else None
        if gated is None:
            return self(x), residual
        summed = self.down_proj.forward_add_norm(gated, residual, next_norm)
        return (summed, None) if summed is not None else (self.down_proj(gated), residual)

    def _gated_one_row(self, x: torch.Tensor | QuantizedRows | SummedRow) -> torch.Tensor | None:
        """``silu(gate) * up`` [1, inter_per_rank] from one kernel (one row on a GPU, the fused kernels
        on), else None."""
        if self.ops.name != "triton":
            return None
        return self.gate_up_proj.forward_gated_one_row(x)

    def weight_names(self, prefix: str) -> list[tuple[object, tuple]]:
        gate_up, down = mlp_modules(f"{prefix}.mlp")
        return [(self.gate_up_proj, ([f"{m}.weight" for m in gate_up],)), (self.down_proj, (f"{down}.weight",))]


class LlamaDecoderLayer(NamedWeights, nn.Module):
    """Pre-norm attention and feed-forward blocks; ``mlp`` is Llama's MLP or a family's own (MoE).

    The residual stream travels as two tensors, ``hidden + residual``, so that each norm takes the
    add before it (one fused kernel with TritonOps); the sums are those of ``h = h + block(norm(h))``.
    Where the block's first product quantizes its input (FP8, kernels/fp8.py), the norm hands it over
    quantized; the residual stream stays in the model dtype. A decode step of one row may instead
    add the residual in a block's last product and leave the norm to the next block's first (a
    SummedRow, kernels/one_row.py): the stream is then the SummedRow alone, ``residual`` None.
    """

    def __init__(self, cfg, groups, rotary, attention_fn, dtype, device, mlp: nn.Module, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(cfg, groups, rotary, attention_fn, dtype, device, prefix)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = mlp

    def forward(self, hidden: torch.Tensor | SummedRow, residual: torch.Tensor | None, meta: AttentionMetadata,
                kv_cache: tuple, next_norm: RMSNorm | None = None) -> tuple[torch.Tensor | SummedRow,
                                                                            torch.Tensor | None]:
        """(this layer's MLP output, the residual stream before it), or (a SummedRow, None) where the
        MLP's last product added the residual and left ``next_norm`` to the next layer's first;
        ``residual`` None on a stage's first layer, whose ``hidden`` is then the whole stream (or
        after a layer that returned a SummedRow). ``next_norm``: the norm after this layer (the next
        layer's input norm) where the next layer's attention takes it, else None."""
        num_tokens = hidden.shape[0]
        hidden, residual = self.input_layernorm.add_norm(hidden, residual,
                                                         self.self_attn.takes_quantized_rows(num_tokens))
        handed = self.post_attention_layernorm if self.mlp.takes_summed_row() else None
        hidden, residual = self.self_attn.forward_add(hidden, meta, kv_cache, residual, handed)
        hidden, residual = self.post_attention_layernorm.add_norm(hidden, residual,
                                                                  self.mlp.takes_quantized_rows(num_tokens))
        return self.mlp.forward_add(hidden, residual, next_norm)

    def weight_names(self, prefix: str) -> list[tuple[object, tuple]]:
        return [(self.input_layernorm, (f"{prefix}.input_layernorm.weight",)),
                (self.post_attention_layernorm, (f"{prefix}.post_attention_layernorm.weight",)),
                (self.self_attn, (prefix,)), (self.mlp, (prefix,))]


class LlamaForCausalLM(NamedWeights, nn.Module):
    """One pipeline stage of the model on one TP rank."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, device,
                 max_positions: int, attention_fn=paged_attention_reference):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        mapping = groups.mapping
        tp = groups.tp
        self.layer_ids = mapping.layer_range(cfg.num_layers)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, device)
        self.ops = TORCH_OPS
        needs_embed = mapping.is_first_pp_rank or (mapping.is_last_pp_rank and cfg.tie_word_embeddings)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
                             if needs_embed else None)
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(cfg, groups, self.rotary, attention_fn, dtype, device,
                                      self.make_mlp(cfg, i, groups, dtype, device), f"model.layers.{i}")
            for i in self.layer_ids})
        self.norm = self.lm_head = None
        if mapping.is_last_pp_rank:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            tied = self.embed_tokens if cfg.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, device, tied_to=tied)

    def make_mlp(self, cfg: ModelConfig, layer: int, groups: ParallelGroups, dtype, device) -> nn.Module:
        """The feed-forward block of decoder layer ``layer``; families with other blocks override it."""
        return LlamaMLP(cfg, groups, dtype, device, f"model.layers.{layer}")

    def use_ops(self, ops: TorchOps) -> None:
        """Run the norms, rotary embeddings and Llama MLPs' SiLU-and-mul through ``ops``
        (runtime/fused_ops.py: TorchOps, or TritonOps' fused kernels)."""
        self.ops = self.rotary.ops = ops
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaMLP)):
                module.ops = ops

    @property
    def attention_layers(self) -> list[LlamaAttention]:
        return [layer.self_attn for layer in self.layers.values()]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(token_ids)  # [num_tokens, hidden]

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata, kv_caches: list[tuple]) -> torch.Tensor:
        """This stage's layers on ``hidden`` [num_tokens, hidden]; returns the residual stream after them."""
        residual = None
        layers = list(self.layers.values())
        for i, (layer, kv) in enumerate(zip(layers, kv_caches)):
            after = layers[i + 1] if i + 1 < len(layers) else None
            next_norm = after.input_layernorm if after is not None and after.self_attn.takes_summed_row() else None
            hidden, residual = layer(hidden, residual, meta, kv, next_norm)
        return hidden if residual is None else hidden + residual

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and this rank's vocab shard of the logits: [num_rows, vocab_per_rank], written
        into ``out`` when given (a graph's static buffer: no copy after the product)."""
        return self.lm_head(self.norm(hidden), out)

    # --- weights -----------------------------------------------------------------------------
    def weight_names(self, prefix: str = "") -> list[tuple[object, tuple]]:
        names = []
        if self.embed_tokens is not None:
            names.append((self.embed_tokens, ("model.embed_tokens.weight",)))
        names += [(layer, (f"model.layers.{i}",)) for i, layer in self.layers.items()]
        if self.norm is not None:
            names.append((self.norm, ("model.norm.weight",)))
            if not self.cfg.tie_word_embeddings:
                names.append((self.lm_head, ("lm_head.weight",)))
        return names

    def load(self, reader: CheckpointReader, prefix: str = "") -> None:
        """Check every tensor's presence and shape first, then load this rank's shards."""
        reader.check(self.expected_shapes(prefix))
        NamedWeights.load(self, reader, prefix)
