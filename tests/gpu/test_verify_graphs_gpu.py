"""Verify steps of speculative decoding in CUDA graphs.

    python3 -m pytest -q tests/gpu/test_verify_graphs_gpu.py
    TRITON_INTERPRET=1 python3 -m pytest -q tests/gpu/test_verify_graphs_gpu.py   (the kernel part, on the CPU)

- a verify step padded as the graphs run it (1 + k query tokens a sequence, padding sequences),
  run eagerly through the Triton attention kernel, gives the unpadded step's logits (the kernel
  places a query row from its sequence's length, which the padding raises);
- on a GPU: every verify bucket has a graph, the decode and verify graphs' memory stays within the
  reserve, and verify plans of 0..k drafts replay the graph of their bucket with the eager logits;
- through LLM(...): greedy tokens with n-gram drafts and with the target as its own draft model are
  those of the engine without graphs and of plain decoding (fp32), and verify graphs were replayed.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.gpu.kernel_device import DEVICE, KERNEL_MARKS, needs_cuda
from tests.model_factory import make_random_model
from tests.verify_plans import eager_and_padded_logits, make_runner, verify_plan

pytestmark = KERNEL_MARKS

VOCAB_SIZE, BLOCK_SIZE, NUM_BLOCKS, MAX_MODEL_LEN, K = 320, 16, 64, 96, 4
SEQS = [(9, 0), (40, 1), (3, 2), (21, 3), (17, 4), (MAX_MODEL_LEN - 4, 3)]  # (cached tokens, drafts)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=5, vocab_size=VOCAB_SIZE,
                             num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128)


@pytest.mark.parametrize("batch", [len(SEQS), 8])
def test_padded_verify_step_through_the_triton_kernel(tiny_path, batch):
    pytest.importorskip("triton")
    runner = make_runner(tiny_path, DEVICE, NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN, K, dtype="float32",
                         attention_backend="triton", enable_fused_kernels=False)
    plan = verify_plan(SEQS, NUM_BLOCKS, BLOCK_SIZE, VOCAB_SIZE, seed=1)
    expected, got, _, same_kv = eager_and_padded_logits(runner, plan, batch, K)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert same_kv
    runner.shutdown()


# Mid-sized, so that the graphs' activations and logits outweigh the fixed allowances of the estimate.
MID = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
       "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
       "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
       "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
MAX_BATCH, MID_BLOCKS, MID_MAX_LEN = 256, 2048, 512


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    path = tmp_path_factory.mktemp("mid")
    (path / "config.json").write_text(json.dumps(MID))
    runner = make_runner(path, "cuda", MID_BLOCKS, BLOCK_SIZE, MID_MAX_LEN, K, dtype="bfloat16",
                         load_format="random", skip_tokenizer_init=True)
    runner.capture_cuda_graphs(MAX_BATCH)
    yield runner
    runner.shutdown()


@needs_cuda
def test_every_verify_bucket_has_a_graph_within_the_reserved_memory(captured):
    from meshlm.executor.verify_graphs import verify_buckets
    assert captured.verify_graph_runner.batch_sizes == verify_buckets(MAX_BATCH, K)
    assert 0 < captured.graph_memory_bytes <= captured.graph_memory_reserve_bytes(MAX_BATCH), (
        captured.graph_memory_bytes, captured.graph_memory_reserve_bytes(MAX_BATCH))


def _eager_logits(runner, plan):
    graphs, runner.verify_graph_runner = runner.verify_graph_runner, None
    try:
        return runner.forward_logits(plan)
    finally:
        runner.verify_graph_runner = graphs


@needs_cuda
@pytest.mark.parametrize("num_seqs", [1, 3, 17, 60])
def test_verify_step_replays_its_bucket_and_matches_eager(captured, num_seqs):
    import numpy as np
    rng = np.random.default_rng(num_seqs)
    seqs = [(int(rng.integers(0, MID_MAX_LEN - K)), int(rng.integers(0, K + 1))) for _ in range(num_seqs)]
    seqs[0] = (MID_MAX_LEN - 1 - K, K)  # ends at max_model_len
    plan = verify_plan(seqs, MID_BLOCKS, BLOCK_SIZE, MID["vocab_size"], seed=num_seqs)
    graphs = captured.verify_graph_runner
    replays = graphs.num_replays
    got = captured.forward_logits(plan).clone()
    assert graphs.num_replays == replays + 1, "the step ran eagerly"
    assert graphs.replayed_batch == graphs.bucket(num_seqs)
    expected = _eager_logits(captured, plan)
    assert got.shape == expected.shape == (len(plan.logits_token_index()), MID["vocab_size"])
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < 2e-2, error  # bf16 through two layers, GEMMs of other shapes
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9
    assert float((got.roll(1, dims=0) - expected).abs().max() / expected.abs().max()) > 0.1


PROMPTS = [[5, 17, 33, 91] * 6, list(range(10, 40)) * 2, [7, 8, 9] * 9, list(range(100, 300, 3))]


def _generate(path, spec, **engine):
    from meshlm import LLM, SamplingParams
    with LLM(str(path), device="cuda", dtype="float32", block_size=16, max_model_len=512, num_kv_blocks=256,
             speculative_config=spec, **engine) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
        stats = llm.engine_core.spec_decode_stats
        verify_graphs = llm.local_model_runner().verify_graph_runner
        replays = 0 if verify_graphs is None else verify_graphs.num_replays
    return [o.outputs[0].token_ids for o in outs], stats, replays


@needs_cuda
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_tokens_with_verify_graphs_equal_eager_and_plain(tmp_path, method):
    path = make_random_model(tmp_path / "llama", "llama", weight_std=0.2, hidden_size=256, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=512)
    spec = ({"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
            if method == "ngram" else {"method": "draft_model", "model": str(path), "num_speculative_tokens": K})
    plain, _, _ = _generate(path, None)
    eager, _, no_replays = _generate(path, spec, enable_cuda_graphs=False)
    graphed, stats, replays = _generate(path, spec)
    assert no_replays == 0 and replays > 0
    assert graphed == eager == plain
    assert stats.num_draft_tokens > 0  # the prompts repeat, so n-gram drafts were proposed and verified
    if method == "draft_model":  # the target as its own draft: nearly every draft holds (fp32)
        assert stats.acceptance_rate > 0.9, (stats.num_accepted_tokens, stats.num_draft_tokens)
    print(f"{method}: acceptance {stats.acceptance_rate:.2f}, {replays} verify graph replays")
