"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

The attention, embedding, pipeline split and LM head are Llama's (models/llama.py); the MLP of an
MoE layer is a sparse block: a replicated router picks the top-k experts of each token, this
rank's experts (parallel/experts.py) compute their partial sums, Qwen2-MoE adds its sigmoid-gated
shared expert (split over the whole TP group), and one all-reduce over the TP group combines all
of it. Qwen-MoE layers listed in ``mlp_only_layers`` (or off ``decoder_sparse_step``) keep a dense MLP.

Checkpoint names (transformers' ``save_pretrained`` writes the per-expert form):

- Mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` [E, hidden] and
  ``...block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (gate, up, down).
- Qwen-MoE: ``model.layers.{i}.mlp.gate.weight`` and
  ``...mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``; Qwen2-MoE also
  ``...mlp.shared_expert.{gate,up,down}_proj.weight`` and ``...mlp.shared_expert_gate.weight`` [1, hidden].
- Fused, for any family (transformers 5's in-memory form, whose Mixtral block is ``mlp`` too):
  ``model.layers.{i}.mlp.gate.weight``, ``...mlp.experts.gate_up_proj`` [E, 2 * moe_inter, hidden]
  and ``...mlp.experts.down_proj`` [E, hidden, moe_inter]; found by name at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.models.llama import LlamaForCausalLM, LlamaMLP, mlp_modules
from meshlm.models.named_weights import NamedWeights
from meshlm.parallel.experts import ExpertNames, FusedMoE, Router
from meshlm.parallel.groups import ParallelGroups
from meshlm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from meshlm.weights.checkpoint import CheckpointReader
from meshlm.weights.model_config import ModelConfig


def expert_names(cfg: ModelConfig, prefix: str, is_fused: bool = False) -> tuple[str, ExpertNames]:
    """(the MoE block's checkpoint prefix, its experts' names) for layer ``prefix``.

    A fused checkpoint uses transformers 5's module names: the block is ``mlp`` for Mixtral too.
    """
    p = f"{prefix}.block_sparse_moe" if cfg.architecture == "MixtralForCausalLM" and not is_fused else f"{prefix}.mlp"
    gate, up, down = (("w1", "w3", "w2") if cfg.architecture == "MixtralForCausalLM"
                      else ("gate_proj", "up_proj", "down_proj"))
    return p, ExpertNames(f"{p}.experts.{{e}}.{gate}.weight", f"{p}.experts.{{e}}.{up}.weight",
                          f"{p}.experts.{{e}}.{down}.weight", f"{prefix}.mlp.experts.gate_up_proj",
                          f"{prefix}.mlp.experts.down_proj")


def expert_modules(cfg: ModelConfig, names: ExpertNames) -> list[str]:
    """Every expert's gate, up and down module of one layer: quantized all or none."""
    return [template.format(e=e).removesuffix(".weight") for e in range(cfg.num_experts)
            for template in (names.gate, names.up, names.down)]


class SharedExpert(NamedWeights, nn.Module):
    """Qwen2-MoE's always-on expert, split over the TP group like a dense MLP.

    ``forward`` returns this rank's partial sum: its reduction is folded into the MoE block's one
    ``combine_from_experts``, so ``down_proj`` gives its unreduced ``matmul``, not its forward.
    """

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, dtype, device, prefix: str):
        super().__init__()
        tp, hidden_size, intermediate_size = groups.tp, cfg.hidden_size, cfg.shared_expert_intermediate_size
        gate_up, down = mlp_modules(f"{prefix}.shared_expert")  # prefix: the MoE block's
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size] * 2, tp, False, dtype, device,
                                                 quant=cfg.layer_quantization(gate_up))
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, False, dtype, device,
                                           quant=cfg.layer_quantization([down]))
        self.gate = Router(hidden_size, 1, 1, False, dtype, device)  # shared_expert_gate: [1, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [num_tokens, inter_per_rank] each
        partial = self.down_proj.matmul(F.silu(gate) * up)  # [num_tokens, hidden], unreduced
        return torch.sigmoid(F.linear(x, self.gate.weight)) * partial

    def weight_names(self, p: str) -> list[tuple[object, tuple]]:
        gate_up, down = mlp_modules(f"{p}.shared_expert")
        return [(self.gate_up_proj, ([f"{m}.weight" for m in gate_up],)), (self.down_proj, (f"{down}.weight",)),
                (self.gate, (f"{p}.shared_expert_gate.weight",))]


class SparseMoeBlock(NamedWeights, nn.Module):
    """Router, this rank's experts, the optional shared expert; one all-reduce combines them.
    ``prefix``: the decoder layer's checkpoint name (``model.layers.N``)."""

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, dtype: torch.dtype, device, prefix: str):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        self.gate = Router(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                           dtype, device)
        block, names = expert_names(cfg, prefix)
        self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size,
                                groups.mapping, dtype, device, quant=cfg.layer_quantization(expert_modules(cfg, names)))
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(cfg, groups, dtype, device, block)

    def takes_quantized_rows(self, num_tokens: int) -> bool:
        """Never: the router, the experts and the shared expert read the hidden states in the model dtype."""
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every TP rank holds every token ([num_tokens, hidden]) after the attention all-reduce,
        # and each rank's experts pick out the tokens routed to them: no dispatch is needed.
        topk_weights, topk_ids = self.gate(x)  # [num_tokens, top_k] each
        partial = self.experts(x, topk_weights, topk_ids)  # [num_tokens, hidden], this rank's share
        if self.shared_expert is not None:
            partial = partial + self.shared_expert(x)
        return self.groups.combine_from_experts(partial)

    def takes_summed_row(self) -> bool:
        """Never: the router and the experts read the normed rows."""
        return False

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor | None,
                    next_norm) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(block output, ``residual``): the experts never add the residual themselves (LlamaMLP's
        forward_add does for one row)."""
        return self(x), residual

    def _names(self, prefix: str) -> tuple[str, ExpertNames]:
        return expert_names(self.cfg, prefix, self.experts.is_fused_checkpoint)

    def weight_names(self, prefix: str) -> list[tuple[object, tuple]]:
        p, names = self._names(prefix)
        parts = [(self.gate, (f"{p}.gate.weight",)), (self.experts, (names,))]
        if self.shared_expert is not None:
            parts.append((self.shared_expert, (p,)))
        return parts

    def detect_layout(self, reader, prefix: str) -> None:
        self.experts.detect_layout(reader, expert_names(self.cfg, prefix)[1])


class MoeForCausalLM(LlamaForCausalLM):
    """One pipeline stage of an MoE model on one rank; all but the decoder layers are Llama's."""

    def make_mlp(self, cfg: ModelConfig, layer: int, groups: ParallelGroups, dtype, device) -> nn.Module:
        """A sparse MoE block, or Llama's MLP on a dense layer of Qwen-MoE."""
        if cfg.is_moe_layer(layer):
            return SparseMoeBlock(cfg, groups, dtype, device, f"model.layers.{layer}")
        return LlamaMLP(cfg, groups, dtype, device, f"model.layers.{layer}")

    @property
    def moe_blocks(self) -> dict[int, SparseMoeBlock]:
        """This stage's MoE blocks by global layer index."""
        return {int(i): layer.mlp for i, layer in self.layers.items() if isinstance(layer.mlp, SparseMoeBlock)}

    def load(self, reader: CheckpointReader, prefix: str = "") -> None:
        # The experts' layout (per expert or fused) decides which names weight_names lists.
        for i, block in self.moe_blocks.items():
            block.detect_layout(reader, f"model.layers.{i}")
        super().load(reader, prefix)
