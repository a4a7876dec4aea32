"""The residual stream when a one-row product adds the residual and leaves the next RMS norm to the
product after it (kernels/one_row.py's SummedRow), on the CPU.

The kernels run on a GPU only (tests/gpu/test_norm_in_products*.py); here the model takes their
branches with the torch arithmetic: ops named "triton" (the fused-kernel branches) and the
layers' one-row entry points replaced by torch functions that give what the kernels give. The
products after a SummedRow run the norm first (SummedRow.normed), which is the norm kernel's
arithmetic on the same sum, so a one-token step gives the logits of the plain stream bitwise:
every layer's residual, the hand-over between layers and the last layer's plain end are checked by
that, and blocks that cannot take the norm (an MoE block, a QKV product with q/k norms) are not
handed one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meshlm.config import EngineArgs, EngineConfig
from meshlm.executor.model_runner import ModelRunner
from meshlm.kernels.attention import AttentionMetadata
from meshlm.kernels.fp8 import linear
from meshlm.kernels.fused_ops import TORCH_OPS, TorchOps
from meshlm.kernels.one_row import SummedRow
from meshlm.parallel import layers
from meshlm.parallel.groups import ParallelGroups
from tests.model_factory import make_random_model, make_random_moe_model

NUM_LAYERS = 3


class TorchOpsOnFusedBranches(TorchOps):
    """The torch arithmetic, with the model taking the branches it takes under TritonOps."""
    name = "triton"


def _add_norm(calls: list):
    """one_row_add_norm in torch: the product as ``linear`` computes it, plus the residual rounded
    to the row's dtype (the norm kernel's sum), its scaled row and sums of squares over 8 channels."""
    def add_norm(x, weight, weight_scale, residual, norm):
        if x.shape[0] != 1:
            return None
        calls.append(norm)
        row = (linear(x, weight, weight_scale).float() + residual.float()).to(x.dtype)
        scaled = (row.float() * norm.weight.float()).to(x.dtype)
        return SummedRow(row, scaled, row.float().pow(2).view(-1, 8).sum(dim=1), norm)
    return add_norm


def _gated(calls: list):
    """one_row_silu_and_mul in torch, taking a SummedRow's norm first (the gate/up product takes it)."""
    def gated(x, weight, weight_scale=None):
        if isinstance(x, SummedRow):
            calls.append(x.norm)
            x = x.normed()
        if x.shape[0] != 1:
            return None
        return TORCH_OPS.silu_and_mul(linear(x, weight, weight_scale))
    return gated


def _one_token_meta() -> AttentionMetadata:
    return AttentionMetadata(
        positions=torch.tensor([0]), slot_mapping=torch.tensor([0]),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32), seq_lens=torch.tensor([1], dtype=torch.int32),
        block_tables=torch.zeros((1, 1), dtype=torch.int32), max_query_len=1, max_seq_len=1,
        query_lens_host=np.array([1]))


def _logits(path, ops) -> torch.Tensor:
    config = EngineConfig.from_args(EngineArgs(str(path), dtype="bfloat16", max_model_len=64))
    runner = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
    runner.allocate_kv_cache(4, 4)
    runner.model.use_ops(ops)
    with torch.inference_mode():
        hidden = runner.model.embed(torch.tensor([11]))
        return runner.model.compute_logits(runner.model(hidden, _one_token_meta(), runner.kv_caches))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral"])
def test_a_step_with_the_residual_added_in_the_products_gives_the_plain_logits(tmp_path, family, monkeypatch):
    make = make_random_moe_model if family == "mixtral" else make_random_model
    path = make(tmp_path / family, family, seed=3, num_hidden_layers=NUM_LAYERS)
    plain = _logits(path, TORCH_OPS)
    adds, takes = [], []
    monkeypatch.setattr(layers, "one_row_add_norm", _add_norm(adds))
    monkeypatch.setattr(layers, "one_row_silu_and_mul", _gated(takes))
    got = _logits(path, TorchOpsOnFusedBranches())
    assert torch.equal(got, plain)
    if family == "llama":  # each output projection, each down projection but the last
        assert len(adds) == 2 * NUM_LAYERS - 1
    elif family == "qwen3":  # q and k normed: the down projections keep the residual to the norm kernel
        assert len(adds) == NUM_LAYERS and all(norm.weight.shape == adds[0].weight.shape for norm in adds)
    else:  # the MoE block reads normed rows: nothing handed over
        assert not adds
    assert len(takes) == (0 if family == "mixtral" else NUM_LAYERS)  # each gate/up took the norm handed to it
    assert len({id(norm) for norm in adds}) == len(adds)  # a norm handed over once


def test_the_hand_over_can_be_seen(tmp_path, monkeypatch):
    """The check above can fail: a sum missing the residual changes the logits."""
    path = make_random_model(tmp_path / "llama", "llama", seed=3, num_hidden_layers=NUM_LAYERS)
    plain = _logits(path, TORCH_OPS)
    adds = []
    add_norm = _add_norm(adds)

    def without_residual(x, weight, weight_scale, residual, norm):
        return add_norm(x, weight, weight_scale, torch.zeros_like(residual), norm)

    monkeypatch.setattr(layers, "one_row_add_norm", without_residual)
    assert not torch.equal(_logits(path, TorchOpsOnFusedBranches()), plain)
