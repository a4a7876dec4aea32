"""A one-row decode step with the norms inside the products around them (kernels/one_row.py's
SummedRow), on a GPU:

    python3 -m pytest -q tests/gpu/test_norm_in_products_gpu.py

Three decoder layers of Llama-3-8B's shape (the shapes the H200's one-row launch shapes name),
random weights and KV cache, bf16 and FP8 weights: with the hand-over on, each layer's output
projection and every down projection but the last add the residual, and the QKV and gate/up
products take the norm; the step, eager and replayed from its CUDA graph, gives the logits of the
step without it within the norm's bf16 roundings (a few 1e-3 of the logits' range), and the same
greedy token.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from meshlm.config import EngineConfig  # noqa: E402
from meshlm.executor.model_runner import ModelRunner  # noqa: E402
from meshlm.kernels import fp8, gemv_triton, one_row  # noqa: E402
from meshlm.kernels.tuned_configs import device_name, tuned_entry  # noqa: E402
from meshlm.parallel.groups import ParallelGroups  # noqa: E402
from meshlm.protocol import StepPlan  # noqa: E402
from meshlm.weights.model_config import ModelConfig  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_LAYERS = 3
SHAPE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 32, "num_key_value_heads": 8,
         "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
BLOCK_SIZE, NUM_BLOCKS, CONTEXT = 16, 64, 200


def _plan() -> StepPlan:
    rng = np.random.default_rng(0)
    width = -(-CONTEXT // BLOCK_SIZE)
    table = rng.permutation(NUM_BLOCKS)[:width].astype(np.int32)[None, :]
    position = CONTEXT - 1
    slot = int(table[0, position // BLOCK_SIZE]) * BLOCK_SIZE + position % BLOCK_SIZE
    return StepPlan(input_ids=np.array([7], dtype=np.int64), positions=np.array([position], dtype=np.int64),
                    slot_mapping=np.array([slot], dtype=np.int64), query_start_loc=np.arange(2, dtype=np.int32),
                    seq_lens=np.array([CONTEXT], dtype=np.int32), block_tables=table,
                    sample_rows=np.arange(1, dtype=np.int64), sample_request_ids=["0"])


def _runner(root, quantization) -> ModelRunner:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(SHAPE))
    config = EngineConfig.for_random_weights(ModelConfig.from_dir(root), dtype="bfloat16", max_model_len=512,
                                             **({"quantization": quantization} if quantization else {}))
    runner = ModelRunner(config, ParallelGroups.single(), torch.device("cuda"))
    runner.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k_cache, v_cache in runner.kv_caches:
        k_cache.copy_(torch.randn(k_cache.shape, generator=gen, device="cuda").to(k_cache.dtype))
        v_cache.copy_(torch.randn(v_cache.shape, generator=gen, device="cuda").to(v_cache.dtype))
    return runner


def _logits(runner: ModelRunner, plan: StepPlan, eager: bool) -> torch.Tensor:
    graphs = runner.graph_runner
    if eager:
        runner.graph_runner = None
    try:
        return runner.forward_logits(plan).float().clone()
    finally:
        runner.graph_runner = graphs


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8"])
def test_one_row_step_with_the_norms_inside_the_products(tmp_path, quantization, monkeypatch):
    weight_dtype = torch.bfloat16 if quantization is None else fp8.FP8_DTYPE
    card = device_name(torch.device("cuda"))
    if tuned_entry(gemv_triton.gemv_config(weight_dtype), card, 6144, 4096, 1) is None:
        pytest.skip(f"no one-row launch shapes recorded for {card}")
    runner = _runner(tmp_path / "m", quantization)
    plan = _plan()
    try:
        # the KV write of each step rewrites the same slot with the same values: steps repeat
        one_row.set_norm_in_products(False)
        try:
            plain = _logits(runner, plan, eager=True)
        finally:
            one_row.set_norm_in_products(True)
        adds = _count_calls(monkeypatch, gemv_triton, "one_row_add_norm")
        takes = _count_calls(monkeypatch, gemv_triton, "NormIn")
        fused = _logits(runner, plan, eager=True)
        # every output projection, every down projection but the last; the QKV and gate/up after them
        assert len(adds) == 2 * NUM_LAYERS - 1 and len(takes) == 2 * NUM_LAYERS - 1, (len(adds), len(takes))
        runner.capture_cuda_graphs(1)
        replays = runner.graph_runner.num_replays
        replayed = _logits(runner, plan, eager=False)
        assert runner.graph_runner.num_replays == replays + 1
        span = float(plain.max() - plain.min())
        for got in (fused, replayed):  # the graph's attention may split the context otherwise: not bitwise
            assert float((got - plain).abs().max()) < 1e-2 * span, float((got - plain).abs().max()) / span
        assert float((plain.roll(1, dims=1) - plain).abs().max()) > 1e-1 * span  # the comparison can fail
        assert int(fused.argmax()) == int(plain.argmax())
    finally:
        runner.shutdown()
