"""Decode CUDA graphs for every batch size up to max_batch_size, on a GPU.

    python3 -m pytest -q tests/gpu/test_graph_buckets_gpu.py

- every bucket of default_buckets(1024) has a graph, and the graphs' measured memory stays within
  the estimate reserved before the KV pool is sized (which is about one largest graph: graphs that
  did not share one pool would take several times more);
- a decode step of 1, 3, 17, 100, 300 and 1000 sequences (random context lengths over a random KV
  cache) replays the graph of its bucket and gives the eager step's logits within bf16 tolerance;
- through LLM(...): the automatic max_batch_size decodes 1000 requests in one graph step, and a
  Llama-3-8B-shaped model on a card of 120 GB or more gets at least 1024 sequences at once;
- with short-context graphs (set_short_context_graphs), a small batch of enough (sequence, KV
  head) pairs whose sequences all fit replays its short graph, any other its bucket's graph, both
  with the eager step's logits.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from meshlm.config import EngineArgs, EngineConfig
from meshlm.executor.cuda_graphs import default_buckets
from meshlm.executor.model_runner import ModelRunner
from meshlm.parallel.groups import ParallelGroups
from meshlm.protocol import StepPlan
from meshlm.weights.model_config import ModelConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Mid-sized, so that the graphs' activations and logits outweigh the fixed allowance of the estimate.
MID = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
       "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000,
       "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
       "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
LLAMA3_8B = {**MID, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
MAX_BATCH, BLOCK_SIZE, MAX_CONTEXT = 1024, 16, 128
BLOCKS_PER_SEQ = MAX_CONTEXT // BLOCK_SIZE
NUM_BLOCKS = MAX_BATCH * BLOCKS_PER_SEQ


def _config_dir(root, shape: dict):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(shape))
    return root


def _mid_runner(root, seed: int) -> ModelRunner:
    """A MID model's runner over a random KV pool of NUM_BLOCKS blocks (graphs not captured yet)."""
    path = _config_dir(root, MID)
    config = EngineConfig.for_random_weights(ModelConfig.from_dir(path), dtype="bfloat16", max_model_len=512)
    runner = ModelRunner(config, ParallelGroups.single(), torch.device("cuda"))
    runner.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for k_cache, v_cache in runner.kv_caches:
        k_cache.normal_(generator=gen)
        v_cache.normal_(generator=gen)
    return runner


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    runner = _mid_runner(tmp_path_factory.mktemp("mid"), 0)
    runner.capture_cuda_graphs(MAX_BATCH)
    yield runner
    runner.shutdown()


def decode_plan(num_seqs: int, seed: int, max_context: int = MAX_CONTEXT, first_len: int | None = None) -> StepPlan:
    """One decode token for each of ``num_seqs`` sequences of random lengths in [1, max_context]
    (the first ``first_len`` long if given), each over its own random KV blocks."""
    rng = np.random.default_rng(seed)
    seq_lens = rng.integers(1, max_context + 1, num_seqs).astype(np.int32)
    if first_len is not None:
        seq_lens[0] = first_len
    width = int(-(-seq_lens.max() // BLOCK_SIZE))
    tables = rng.permutation(NUM_BLOCKS)[:num_seqs * BLOCKS_PER_SEQ].reshape(num_seqs, BLOCKS_PER_SEQ)
    tables = np.ascontiguousarray(tables[:, :width]).astype(np.int32)  # [num_seqs, width]
    positions = (seq_lens - 1).astype(np.int64)
    slots = tables[np.arange(num_seqs), positions // BLOCK_SIZE].astype(np.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
    return StepPlan(input_ids=rng.integers(3, MID["vocab_size"], num_seqs).astype(np.int64), positions=positions,
                    slot_mapping=slots, query_start_loc=np.arange(num_seqs + 1, dtype=np.int32), seq_lens=seq_lens,
                    block_tables=tables, sample_rows=np.arange(num_seqs, dtype=np.int64),
                    sample_request_ids=[str(i) for i in range(num_seqs)])


def eager_logits(runner: ModelRunner, plan: StepPlan) -> torch.Tensor:
    graphs, runner.graph_runner = runner.graph_runner, None
    try:
        return runner.forward_logits(plan)
    finally:
        runner.graph_runner = graphs


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_every_bucket_has_a_graph_within_the_reserved_memory(runner):
    graphs = runner.graph_runner
    assert graphs.batch_sizes == default_buckets(MAX_BATCH)
    assert 0 < runner.graph_memory_bytes <= runner.graph_memory_reserve_bytes(MAX_BATCH), (
        runner.graph_memory_bytes, runner.graph_memory_reserve_bytes(MAX_BATCH))


@pytest.mark.parametrize("num_seqs", [1, 3, 17, 100, 300, 1000])
def test_decode_step_replays_its_bucket_and_matches_eager(runner, num_seqs):
    plan = decode_plan(num_seqs, seed=num_seqs)
    graphs = runner.graph_runner
    replays = graphs.num_replays
    got = runner.forward_logits(plan).clone()
    assert graphs.num_replays == replays + 1, "the step ran eagerly"
    assert graphs.replayed_batch == next(b for b in default_buckets(MAX_BATCH) if b >= num_seqs)
    expected = eager_logits(runner, plan)
    assert got.shape == expected.shape == (num_seqs, MID["vocab_size"])
    # bf16 through two layers, with GEMMs of other shapes (the bucket's padded rows): a few 1e-3.
    assert relative_error(got, expected) < 2e-2, relative_error(got, expected)
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree  # near-ties of random weights may flip under bf16 rounding
    if num_seqs > 1:  # the comparison can fail: one row off is seen
        assert relative_error(got.roll(1, dims=0), expected) > 0.1


def test_graph_replay_is_repeatable(runner):
    """The same plan twice: the graph rewrites the same K/V and gives the same logits."""
    plan = decode_plan(37, seed=1)
    first = runner.forward_logits(plan).clone()
    assert torch.equal(runner.forward_logits(plan), first)


def _llm(path, **kwargs):
    from meshlm import LLM
    return LLM(str(path), load_format="random", skip_tokenizer_init=True, device="cuda", dtype="bfloat16",
               max_model_len=512, **kwargs)


def test_auto_max_batch_size_decodes_1000_requests_in_one_graph_step(tmp_path):
    from meshlm import SamplingParams
    assert EngineArgs().max_batch_size is None
    llm = _llm(_config_dir(tmp_path / "mid", MID))
    try:
        engine = llm.local_model_runner()
        max_batch_size = llm.engine_core.max_batch_size
        assert max_batch_size >= 1024  # a small model's KV pool on a large card: the cap
        assert engine.graph_runner.batch_sizes == default_buckets(max_batch_size)
        assert engine.model.ops.name == "triton", "fused kernels are on by default on CUDA"
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 32000, int(n)).tolist() for n in rng.integers(4, 40, 1000)]
        batches = []
        run = engine.graph_runner.run

        def spy(plan, *rest):
            batches.append(plan.num_seqs)
            return run(plan, *rest)

        engine.graph_runner.run = spy
        # Eight tokens each: every prompt is in by the third step, the first finish at the eighth.
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        assert 1000 in batches, sorted(set(batches))[-5:]
    finally:
        llm.shutdown()


def test_llama3_8b_shape_runs_1024_sequences_at_once(tmp_path):
    total = torch.cuda.mem_get_info()[1]
    if total < 120 * 2**30:
        pytest.skip(f"needs a card of 120 GB or more ({total / 2**30:.0f} GiB here)")
    llm = _llm(_config_dir(tmp_path / "8b", LLAMA3_8B))
    try:
        engine = llm.local_model_runner()
        max_batch_size = llm.engine_core.max_batch_size
        assert max_batch_size >= 1024
        assert engine.graph_runner.batch_sizes[-1] == max_batch_size
        assert llm.engine_core.num_kv_blocks * 16 >= 1024 * 512  # 1024 sequences of 512 tokens fit
        assert engine.graph_memory_bytes <= engine.graph_memory_reserve_bytes(max_batch_size)
        print(f"\n8B shape on {torch.cuda.get_device_name()}: max_batch_size {max_batch_size}, "
              f"{llm.engine_core.num_kv_blocks} KV blocks, graphs {engine.graph_memory_bytes / 2**30:.2f} GiB "
              f"(reserved {engine.graph_memory_reserve_bytes(max_batch_size) / 2**30:.2f} GiB)")
    finally:
        llm.shutdown()


SHORT_CONTEXT = 64


@pytest.fixture(scope="module")
def short_runner(tmp_path_factory):
    from meshlm.executor import cuda_graphs
    runner = _mid_runner(tmp_path_factory.mktemp("mid_short"), 1)
    default = cuda_graphs._SHORT_CONTEXT["tokens"]
    cuda_graphs.set_short_context_graphs(SHORT_CONTEXT)
    try:
        runner.capture_cuda_graphs(32)
    finally:
        cuda_graphs.set_short_context_graphs(default)
    yield runner
    runner.shutdown()


@pytest.mark.parametrize("num_seqs", [1, 5, 16, 17])
@pytest.mark.parametrize("max_context", [SHORT_CONTEXT, MAX_CONTEXT])
def test_short_context_graphs_replay_where_every_sequence_fits(short_runner, num_seqs, max_context):
    longer = MAX_CONTEXT if max_context > SHORT_CONTEXT else None  # one sequence past the short graphs
    plan = decode_plan(num_seqs, seed=num_seqs + max_context, max_context=max_context, first_len=longer)
    graphs = short_runner.graph_runner
    got = short_runner.forward_logits(plan).clone()
    # MID has 4 KV heads: buckets of 8 to 16 sequences reach the 32 programs short graphs need
    fits = max_context <= SHORT_CONTEXT and 5 <= num_seqs <= 16
    assert graphs.replayed_short == fits, (num_seqs, max_context)
    expected = eager_logits(short_runner, plan)
    assert relative_error(got, expected) < 2e-2, relative_error(got, expected)
    if num_seqs > 1:
        assert relative_error(got.roll(1, dims=0), expected) > 0.1
