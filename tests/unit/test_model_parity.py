"""The single-rank engine against Hugging Face transformers on the same random weights (fp32, CPU).

Each family of tests.model_factory: greedy tokens and top-20 logprobs of a batch of prompts through
``LLM.generate``; the full logits of hand-built step plans (batched prefill, a chunked prefill
continued beside decodes, scattered block tables) through ``ModelRunner.forward_logits``; sharded
checkpoints; and the errors for a checkpoint that does not match its config.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from meshlm import LLM, SamplingParams
from meshlm.parallel.groups import ParallelGroups
from meshlm.weights.checkpoint import CheckpointError
from meshlm.config import EngineArgs, EngineConfig
from meshlm.executor.model_runner import ModelRunner
from meshlm.protocol import StepPlan
from tests.model_factory import (FAMILIES, load_reference, make_random_model, random_prompts, reference_greedy,
                                 reference_logits)

NUM_DECODE_STEPS = 16
TOP_K = 20
ATOL = 1e-4
# Prompts shorter and longer than the mistral window (16 tokens); with the outputs, past llama3's
# original context (32 positions).
PROMPT_LENGTHS = (5, 19, 37)
ENGINE_KW = dict(num_kv_blocks=64, block_size=16, max_model_len=256, dtype="float32")


def make_prompts(vocab_size: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    return random_prompts(vocab_size, lengths, seed=1)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    """(family, model directory, transformers reference model)."""
    family = request.param
    path = make_random_model(tmp_path_factory.mktemp(family), family, seed=0)
    return family, path, load_reference(path)


# --- generation through LLM -----------------------------------------------------------------------

def test_greedy_tokens_and_logprobs_match_transformers(family_model):
    family, path, hf_model = family_model
    prompts = make_prompts(hf_model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_DECODE_STEPS, ignore_eos=True, logprobs=TOP_K)
    with LLM(str(path), **ENGINE_KW) as llm:
        outputs = llm.generate(prompts, params)  # one batch of three

    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        ref_tokens, ref_logprobs = reference_greedy(hf_model, prompt, NUM_DECODE_STEPS)
        assert completion.token_ids == ref_tokens, f"{family}, prompt of {len(prompt)} tokens"
        assert completion.finish_reason == "length"
        assert len(completion.logprobs) == NUM_DECODE_STEPS
        for step, (token, entry) in enumerate(zip(ref_tokens, completion.logprobs)):
            ref = ref_logprobs[step]  # [vocab]
            assert len(entry) == TOP_K, f"{family} step {step}: {len(entry)} logprob entries"
            assert next(iter(entry)) == token  # the sampled token comes first
            got_ids = torch.tensor(list(entry.keys()))
            got = torch.tensor(list(entry.values()))
            torch.testing.assert_close(got, ref[got_ids], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{family} step {step}: {m}")
            # The same top-20 values (ids may swap only where two values are equal to ~1e-4).
            torch.testing.assert_close(got.sort(descending=True).values, ref.topk(TOP_K).values,
                                       atol=ATOL, rtol=0, msg=lambda m: f"{family} step {step}: {m}")
        ref_cumulative = float(ref_logprobs[torch.arange(NUM_DECODE_STEPS), torch.tensor(ref_tokens)].sum())
        assert completion.cumulative_logprob == pytest.approx(ref_cumulative, abs=NUM_DECODE_STEPS * ATOL)


# --- full logits of hand-built plans --------------------------------------------------------------

class PlanBuilder:
    """Step plans over a private block layout: sequence i owns the blocks ``block_ids[i]``."""

    def __init__(self, block_ids: list[list[int]], block_size: int):
        self.block_ids = block_ids
        self.block_size = block_size

    def plan(self, seqs: list[tuple[int, int, list[int]]]) -> StepPlan:
        """``seqs``: (sequence index, number of tokens already cached, new token ids), one per row."""
        bs = self.block_size
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        max_blocks = max(len(b) for b in self.block_ids)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int32)
        for row, (seq, num_cached, new_ids) in enumerate(seqs):
            blocks = self.block_ids[seq]
            tables[row, :len(blocks)] = blocks
            pos = np.arange(num_cached, num_cached + len(new_ids))
            input_ids += new_ids
            positions.append(pos)
            slots.append(np.asarray(blocks)[pos // bs] * bs + pos % bs)
            query_lens.append(len(new_ids))
            seq_lens.append(num_cached + len(new_ids))
        query_start_loc = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start_loc[1:])
        return StepPlan(
            input_ids=np.asarray(input_ids, dtype=np.int64),
            positions=np.concatenate(positions).astype(np.int64),
            slot_mapping=np.concatenate(slots).astype(np.int64),
            query_start_loc=query_start_loc,
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_tables=tables,
            sample_rows=np.arange(len(seqs), dtype=np.int64),
            sample_request_ids=[f"seq-{s}" for s, _, _ in seqs])


def make_engine(path, num_blocks: int, block_size: int) -> ModelRunner:
    config = EngineConfig.from_args(EngineArgs(str(path), dtype="float32", max_model_len=256))
    engine = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
    engine.allocate_kv_cache(num_blocks, block_size)
    return engine


def test_full_logits_of_prefill_chunks_and_decodes_match_transformers(family_model):
    family, path, hf_model = family_model
    block_size, num_blocks = 4, 40
    prompts = make_prompts(hf_model.config.vocab_size)
    # Scattered, interleaved blocks so that block tables are really followed.
    perm = np.random.default_rng(2).permutation(num_blocks).tolist()
    block_ids = [perm[0:4], perm[4:14], perm[14:40]]
    builder = PlanBuilder(block_ids, block_size)
    engine = make_engine(path, num_blocks, block_size)
    long_prompt = prompts[2]
    half = len(long_prompt) // 2

    # Step 1: two whole prompts and the first half of the third.
    step1 = builder.plan([(0, 0, prompts[0]), (1, 0, prompts[1]), (2, 0, long_prompt[:half])])
    logits1 = engine.forward_logits(step1)  # [3, vocab]
    ref = [reference_logits(hf_model, p) for p in prompts]
    expected1 = torch.stack([ref[0][-1], ref[1][-1], ref[2][half - 1]])
    assert logits1.shape == expected1.shape
    torch.testing.assert_close(logits1, expected1, atol=ATOL, rtol=0, msg=lambda m: f"{family} step 1: {m}")

    # Step 2: a decode for the first two (their greedy next tokens), the rest of the third prompt.
    next_tokens = [int(ref[0][-1].argmax()), int(ref[1][-1].argmax())]
    step2 = builder.plan([(0, len(prompts[0]), [next_tokens[0]]), (1, len(prompts[1]), [next_tokens[1]]),
                          (2, half, long_prompt[half:])])
    logits2 = engine.forward_logits(step2)
    expected2 = torch.stack([reference_logits(hf_model, prompts[0] + [next_tokens[0]])[-1],
                             reference_logits(hf_model, prompts[1] + [next_tokens[1]])[-1],
                             ref[2][-1]])
    torch.testing.assert_close(logits2, expected2, atol=ATOL, rtol=0, msg=lambda m: f"{family} step 2: {m}")
    engine.shutdown()


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_sharded_checkpoint_gives_the_same_tokens(family, tmp_path):
    sharded = make_random_model(tmp_path / "sharded", family, seed=3, sharded=True)
    single = make_random_model(tmp_path / "single", family, seed=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    prompts = make_prompts(320, lengths=(6, 23))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    hf_model = load_reference(single)
    with LLM(str(sharded), **ENGINE_KW) as llm:
        outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == reference_greedy(hf_model, prompt, 8)[0]


def _rewrite_weights(path, edit) -> None:
    from safetensors.torch import load_file, save_file
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("small"), "llama", seed=4)


def test_missing_tensor_is_named_at_construction(small_model, tmp_path):
    path = shutil.copytree(small_model, tmp_path / "m")
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as err:
        LLM(str(path), **ENGINE_KW)
    message = str(err.value)
    assert name in message and "missing" in message
    assert "[64, 128]" in message  # the shape the config implies: hidden x intermediate


def test_misshapen_tensor_is_named_with_both_shapes(small_model, tmp_path):
    path = shutil.copytree(small_model, tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.weight"

    def reshape(tensors):
        assert list(tensors[name].shape) == [32, 64]  # 2 kv heads x head_dim 16, hidden 64
        tensors[name] = torch.zeros(48, 64)

    _rewrite_weights(path, reshape)
    with pytest.raises(CheckpointError) as err:
        LLM(str(path), **ENGINE_KW)
    message = str(err.value)
    assert name in message
    assert "[48, 64]" in message and "[32, 64]" in message


def test_unsupported_architecture_names_itself_and_the_supported_ones(small_model, tmp_path):
    path = shutil.copytree(small_model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        LLM(str(path), **ENGINE_KW)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message
