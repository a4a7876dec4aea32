"""The memory planner (executor/memory.py, ``meshlm plan``) against the tensors the engine allocates.

- Weight bytes per rank equal the parameter bytes of the model shard built for that rank, for dense
  and MoE families and layouts with tp (KV heads split and replicated), pp and ep.
- KV bytes per token equal the model runner's KV pool tensors per token slot.
- The runner's GPU pool size and ``meshlm plan``'s are one arithmetic.
- ``meshlm plan`` prints a line per rank and refuses layouts whose weights or pool do not fit.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.rank_groups import rank_groups
from meshlm.cli import main
from meshlm.config import CacheConfig, EngineConfig
from meshlm.executor import memory
from meshlm.executor.model_runner import ModelRunner
from meshlm.kernels.attention import paged_attention_reference
from meshlm.models import build_model
from meshlm.parallel.mapping import Mapping
from meshlm.weights.model_config import ModelConfig
from meshlm.weights.quantization import QuantizationConfig

# 9 heads over 3 KV heads as the default model: tp 3 splits the KV heads, tp 9 replicates them.
# A vocabulary of 100 is not a multiple of 3 or 9, so the padded vocab shards are counted too.
_BASE = dict(vocab_size=100, hidden_size=72, intermediate_size=144, num_layers=3, num_heads=9, num_kv_heads=3,
             head_dim=8, max_position_embeddings=64)
CONFIGS = {
    "llama": ModelConfig("LlamaForCausalLM", **_BASE),
    "llama-tied": ModelConfig("LlamaForCausalLM", **_BASE, tie_word_embeddings=True),
    "qwen2-bias": ModelConfig("Qwen2ForCausalLM", **_BASE, attention_bias=True),
    "qwen3-qk-norm": ModelConfig("Qwen3ForCausalLM", **{**_BASE, "head_dim": 12}, qk_norm=True),
    "qwen2-moe": ModelConfig("Qwen2MoeForCausalLM", **_BASE, attention_bias=True, num_experts=6,
                             num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                             mlp_only_layers=(1,)),
    "mixtral-tied": ModelConfig("MixtralForCausalLM", **{**_BASE, "intermediate_size": 24}, num_experts=6,
                                num_experts_per_tok=2, moe_intermediate_size=24, tie_word_embeddings=True),
}
# FP8 linear layers: quantized at load, and a checkpoint with static input scales
FP8 = QuantizationConfig.at_load()
FP8_STATIC = QuantizationConfig("fp8", "tensor", None, True, ())
# Layers a config lists as not quantized keep the model dtype: all of layer 0, one expert block
FP8_IGNORING = QuantizationConfig.at_load(("model.layers.0", "model.layers.2.self_attn.o_proj"))
MOE_FP8_IGNORING = QuantizationConfig("fp8", "tensor", None, True, ("model.layers.0.mlp.experts",
                                                                    "model.layers.2.mlp.shared_expert"))
CONFIGS.update({"llama-fp8": dataclasses.replace(CONFIGS["llama"], quantization=FP8),
                "llama-fp8-ignoring": dataclasses.replace(CONFIGS["llama"], quantization=FP8_IGNORING),
                "qwen2-moe-fp8-ignoring": dataclasses.replace(CONFIGS["qwen2-moe"], quantization=MOE_FP8_IGNORING),
                "qwen2-bias-fp8-static": dataclasses.replace(CONFIGS["qwen2-bias"], quantization=FP8_STATIC),
                "qwen2-moe-fp8-static": dataclasses.replace(CONFIGS["qwen2-moe"], quantization=FP8_STATIC)})
DENSE_LAYOUTS = [(1, 1, 1), (3, 1, 1), (9, 1, 1), (1, 2, 1), (3, 2, 1)]  # (tp, pp, moe_ep)
MOE_LAYOUTS = [(1, 1, 1), (3, 1, 1), (3, 1, 3), (1, 2, 1), (3, 2, 3)]


def mappings(tp: int, pp: int, moe_ep: int) -> list[Mapping]:
    return [Mapping(tp * pp, rank, tp, pp, moe_ep) for rank in range(tp * pp)]


def random_config(cfg: ModelConfig, m: Mapping, dtype: str) -> EngineConfig:
    return EngineConfig.for_random_weights(cfg, dtype=dtype, max_model_len=64, tensor_parallel_size=m.tp,
                                           pipeline_parallel_size=m.pp, moe_expert_parallel_size=m.moe_ep)


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # a tied weight counts once


@pytest.mark.parametrize("name,layout", [(n, lay) for n, cfg in CONFIGS.items()
                                         for lay in (MOE_LAYOUTS if cfg.is_moe else DENSE_LAYOUTS)])
def test_weight_bytes_per_rank_equal_the_parameters_of_the_built_shard(name, layout):
    cfg = CONFIGS[name]
    for m in mappings(*layout):
        model = build_model(cfg, rank_groups(m), torch.bfloat16, "cpu", 64, paged_attention_reference)
        assert memory.weight_bytes(cfg, m, 2) == parameter_bytes(model), f"{name}, {m.describe()}"


@pytest.mark.parametrize("layout", [(1, 1, 1), (3, 2, 1), (9, 1, 1)])
def test_kv_bytes_per_token_equal_the_runners_kv_pool(layout):
    cfg, num_blocks, block_size = CONFIGS["qwen3-qk-norm"], 5, 4
    for m in mappings(*layout):
        runner = ModelRunner(random_config(cfg, m, "float16"), rank_groups(m),
                             torch.device("cpu"))
        runner.allocate_kv_cache(num_blocks, block_size)
        pool = sum(t.numel() * t.element_size() for kv in runner.kv_caches for t in kv)
        slots = (num_blocks + 1) * block_size  # the runner adds one scratch block
        assert memory.kv_bytes_per_token(cfg, m, 2) * slots == pool, m.describe()


def test_the_runners_gpu_pool_is_the_plans(monkeypatch):
    """With only the weights in use, the runner's count on a card is the planner's for that card."""
    cfg, m, total = CONFIGS["llama"], Mapping(3, 1, tp=3), 3 * 2**30
    runner = ModelRunner(random_config(cfg, m, "bfloat16"), rank_groups(m),
                         torch.device("cpu"))
    weights = parameter_bytes(runner.model)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total - weights, total))
    runner.device = torch.device("cuda")  # sizes the pool only; nothing runs on it
    cache = CacheConfig(block_size=16, gpu_memory_utilization=0.5)
    plan = memory.plan_rank(cfg, m, 2, total, cache, max_num_tokens=512, max_batch_size=8)
    assert runner.available_kv_blocks(cache, 512, 8) == plan.num_blocks
    budget = 0.5 * total - weights - plan.reserve_bytes  # what the pool may take, scratch block included
    assert (plan.num_blocks + 1) * plan.kv_bytes_per_token * 16 <= budget
    assert (plan.num_blocks + 2) * plan.kv_bytes_per_token * 16 > budget


# --- meshlm plan ---------------------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
    """A directory holding only config.json (9 heads, 3 KV heads, untied, 1 GiB of bf16 weights)."""
    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=32768, hidden_size=4608, intermediate_size=6144,
              num_hidden_layers=4, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
              torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


@pytest.fixture(autouse=True)
def no_log_handler(monkeypatch):
    """main() would attach the meshlm logger to this test's captured stderr, closed after the test."""
    monkeypatch.setattr("meshlm.launcher.logging.setup_logging", lambda *args, **kwargs: None)


def plan(model_dir, capsys, *flags) -> tuple[int, str, str]:
    code = main(["plan", "--model", str(model_dir), *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_every_rank_and_the_pool(model_dir, capsys):
    code, out, err = plan(model_dir, capsys, "--gpu-memory-gb", "8", "--tp", "3", "--pp", "2",
                          "--max-batch-size", "256")
    assert code == 0, err
    cfg = ModelConfig.from_dir(model_dir)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in ([str(r)] for r in range(6))]
    assert [row[:3] for row in rows] == [[str(r), f"{r % 3}/3", f"{r // 3}/2"] for r in range(6)]
    # The plan reserves the decode graphs' memory, as the engine does on a GPU.
    fewest = min(memory.plan_rank(cfg, m, 2, 8 * 2**30, CacheConfig(), 8192, 256, with_graphs=True).num_blocks
                 for m in mappings(3, 2, 1))
    per_seq = 4096 // 16
    assert (f"{fewest} blocks of 16 tokens (the fewest of any rank) = {fewest * 16} tokens = "
            f"{fewest // per_seq} sequences of max_model_len=4096") in out


def test_plan_refuses_weights_that_do_not_fit(model_dir, capsys):
    # 1 GiB of weights on one 1.5 GiB card: with the reserve, nothing is left for the KV cache.
    code, out, err = plan(model_dir, capsys, "--gpu-memory-gb", "1.5", "--max-num-tokens", "256",
                          "--max-batch-size", "4")
    assert code == 2
    for part in ("x 1.5 GiB", "raise tp (now 1) or pp (now 1)", "smaller dtype (now bfloat16)",
                 "gpu_memory_utilization=0.9"):
        assert part in err, err
    assert "   0    0/1" in out  # the table comes before the refusal


def test_plan_refuses_a_pool_below_one_request(model_dir, capsys):
    code, _, err = plan(model_dir, capsys, "--gpu-memory-gb", "80", "--num-kv-blocks", "100",
                        "--max-model-len", "4096")
    assert code == 2
    assert "100 blocks of 16 tokens = 1600 tokens" in err and "lower max_model_len to at most 1600" in err, err


def test_plan_without_a_gpu_needs_the_gpu_memory(model_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = plan(model_dir, capsys)
    assert code == 2 and "--gpu-memory-gb" in err, err
