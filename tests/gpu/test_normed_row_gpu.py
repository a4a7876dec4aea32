"""A one-row decode step's norms computed inside the products after them (fp8.NormedRow), on a GPU:

    python3 -m pytest -q tests/gpu/test_normed_row_gpu.py

Two decoder layers of Llama-3-8B's shape (the shapes the H200's one-row launch shapes name),
random weights and KV cache, bf16 and FP8 weights: with the hand-over on, one decode step of one
sequence runs each layer's QKV and gate/up products with the norm inside (the others not), eagerly
and replayed from its CUDA graph, and gives the logits of the step without it (bf16 roundings
of the normed row may differ in rare elements: a few 1e-3 of the logits' range).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from meshlm.config import EngineConfig  # noqa: E402
from meshlm.executor.model_runner import ModelRunner  # noqa: E402
from meshlm.kernels import fp8, gemv_triton  # noqa: E402
from meshlm.kernels.tuned_configs import device_name, tuned_entry  # noqa: E402
from meshlm.parallel.groups import ParallelGroups  # noqa: E402
from meshlm.protocol import StepPlan  # noqa: E402
from meshlm.weights.model_config import ModelConfig  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
         "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
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


@pytest.mark.parametrize("quantization", [None, "fp8"], ids=["bf16", "fp8"])
def test_one_row_step_with_the_norms_inside_the_products(tmp_path, quantization, monkeypatch):
    if tuned_entry(gemv_triton.gemv_config(torch.bfloat16 if quantization is None else fp8.FP8_DTYPE),
                               device_name(torch.device("cuda")), 6144, 4096, 1) is None:
        pytest.skip(f"no one-row launch shapes recorded for {device_name(torch.device('cuda'))}")
    runner = _runner(tmp_path / "m", quantization)
    plan = _plan()
    try:
        # the KV write of each step rewrites the same slot with the same values: steps repeat
        plain = _logits(runner, plan, eager=True)
        fused_calls = []
        real = gemv_triton.one_row_gemm
        monkeypatch.setattr(gemv_triton, "one_row_gemm",
                            lambda *a, norm=None, **k: fused_calls.append(norm is not None) or real(*a, norm=norm, **k))
        fp8.set_fused_norm_product(True)
        try:
            fused = _logits(runner, plan, eager=True)
            assert fused_calls.count(True) == 2 * SHAPE["num_hidden_layers"], fused_calls
            runner.capture_cuda_graphs(1)
            replays = runner.graph_runner.num_replays
            replayed = _logits(runner, plan, eager=False)
            assert runner.graph_runner.num_replays == replays + 1
        finally:
            fp8.set_fused_norm_product(False)
        span = float(plain.max() - plain.min())
        for got in (fused, replayed):
            assert float((got - plain).abs().max()) < 1e-2 * span, float((got - plain).abs().max()) / span
        assert float((plain.roll(1, dims=1) - plain).abs().max()) > 1e-1 * span  # the comparison can fail
        assert int(fused.argmax()) == int(plain.argmax())
    finally:
        runner.shutdown()
