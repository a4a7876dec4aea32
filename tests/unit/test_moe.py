"""Mixtral, Qwen2-MoE and Qwen3-MoE against Hugging Face transformers (fp32, CPU), and the expert split.

- Greedy tokens and top-20 logprobs of a batch of prompts through ``LLM.generate`` match
  transformers (with its eager, loop-over-experts implementation) on random weights.
- Every expert-parallel layout (tp, moe_ep) of one MoE block, built rank by rank in this process:
  the ranks' partial sums add up to the single-rank output, and each rank reads only its own
  experts and its own slice of their width from the checkpoint.
- The three expert backends (grouped GEMM, loop over experts, masked) agree.
- A fused-expert checkpoint gives the same tokens as the per-expert one.
- Layouts that do not split the experts or their width fail before loading, naming every number.
"""
from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")

from tests.rank_groups import rank_groups
from meshlm import LLM, SamplingParams
from meshlm.models.moe import SparseMoeBlock
from meshlm.parallel.experts import FusedMoE, route
from meshlm.parallel.groups import ParallelGroups
from meshlm.parallel.mapping import Mapping
from meshlm.config import EngineArgs, ParallelConfig, check_layout
from meshlm.weights.checkpoint import CheckpointReader
from meshlm.weights.model_config import ModelConfig
from tests.model_factory import (MOE_FAMILIES, load_moe_reference, make_random_moe_model, random_prompts,
                                 reference_greedy)

NUM_DECODE_STEPS = 16
TOP_K = 20
ATOL = 1e-4
PROMPT_LENGTHS = (5, 19, 37)
ENGINE_KW = dict(num_kv_blocks=64, block_size=16, max_model_len=256, dtype="float32")


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def moe_model(request, tmp_path_factory):
    """(family, model directory, transformers reference model)."""
    family = request.param
    path = make_random_moe_model(tmp_path_factory.mktemp(family), family, seed=0)
    return family, path, load_moe_reference(path)


def generate(path, prompts, max_tokens=NUM_DECODE_STEPS, logprobs=TOP_K):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    with LLM(str(path), **ENGINE_KW) as llm:
        return llm.generate(prompts, params)


# --- against transformers -------------------------------------------------------------------------

def test_greedy_tokens_and_logprobs_match_transformers(moe_model):
    family, path, hf_model = moe_model
    prompts = random_prompts(hf_model.config.vocab_size, PROMPT_LENGTHS, seed=1)
    outputs = generate(path, prompts)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        ref_tokens, ref_logprobs = reference_greedy(hf_model, prompt, NUM_DECODE_STEPS)
        where = f"{family}, prompt of {len(prompt)} tokens"
        assert completion.token_ids == ref_tokens, where
        for step, entry in enumerate(completion.logprobs):
            ref = ref_logprobs[step]  # [vocab]
            assert len(entry) == TOP_K, f"{where} step {step}"
            got = torch.tensor(list(entry.values()))
            torch.testing.assert_close(got, ref[torch.tensor(list(entry.keys()))], atol=ATOL, rtol=0,
                                       msg=lambda m: f"{where} step {step}: {m}")
            torch.testing.assert_close(got.sort(descending=True).values, ref.topk(TOP_K).values, atol=ATOL,
                                       rtol=0, msg=lambda m: f"{where} step {step}: {m}")


def test_the_test_models_route_to_every_expert(moe_model):
    """A model whose router sent everything to one expert would leave the expert split untested."""
    family, path, hf_model = moe_model
    cfg = ModelConfig.from_dir(path)
    hidden = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    router = dict(hf_model.named_parameters())["model.layers.0.mlp.gate.weight"].detach()  # [E, hidden]
    _, ids = route(hidden @ router.T, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    assert set(ids.flatten().tolist()) == set(range(cfg.num_experts))
    assert cfg.norm_topk_prob == (family != "qwen2-moe")


# --- the expert split, rank by rank in one process -------------------------------------------------

def moe_rank_groups(tp: int, moe_ep: int, rank: int) -> ParallelGroups:
    return rank_groups(Mapping(world_size=tp, rank=rank, tp=tp, moe_ep=moe_ep))


class RecordingReader(CheckpointReader):
    """Records (name, dim, start, stop) of every read."""

    def __init__(self, path):
        super().__init__(path)
        self.reads = []

    def read(self, name, dim=None, start=0, stop=None):
        self.reads.append((name, dim, start, stop))
        return super().read(name, dim, start, stop)


def load_block(path, cfg, groups, layer=0) -> tuple[SparseMoeBlock, RecordingReader]:
    block = SparseMoeBlock(cfg, groups, torch.float32, "cpu", f"model.layers.{layer}")
    reader = RecordingReader(path)
    block.detect_layout(reader, f"model.layers.{layer}")
    reader.check(block.expected_shapes(f"model.layers.{layer}"))
    block.load(reader, f"model.layers.{layer}")
    return block, reader


@pytest.mark.parametrize("tp,moe_ep", [(2, 2), (4, 4), (2, 1), (4, 2), (4, 1)])
def test_ranks_partial_sums_add_up_to_the_single_rank_block(moe_model, tp, moe_ep):
    family, path, _ = moe_model
    cfg = ModelConfig.from_dir(path)
    hidden = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    expected = load_block(path, cfg, ParallelGroups.single())[0](hidden)
    total = torch.zeros_like(expected)
    width = cfg.moe_intermediate_size // (tp // moe_ep)
    for rank in range(tp):
        groups = moe_rank_groups(tp, moe_ep, rank)
        block, reader = load_block(path, cfg, groups)
        first = groups.mapping.moe_ep_rank * (cfg.num_experts // moe_ep)
        own = set(range(first, first + cfg.num_experts // moe_ep))
        expert_reads = [r for r in reader.reads if ".experts." in r[0]]
        assert {int(r[0].split(".experts.")[1].split(".")[0]) for r in expert_reads} == own, f"rank {rank}"
        lo = groups.mapping.moe_tp_rank * width
        assert all(r[1] in (0, 1) and (r[2], r[3]) == (lo, lo + width) for r in expert_reads), expert_reads
        total += block(hidden)
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{family} tp={tp} "
                               f"moe_ep={moe_ep}: {m}")


def make_experts(num_experts=8, top_k=3, hidden=64, inter=32, ep=(0, 1), moe_tp=(0, 1)) -> FusedMoE:
    """Experts of the rank at expert-parallel position ``ep`` = (rank, size) and ``moe_tp`` likewise."""
    tp = ep[1] * moe_tp[1]
    rank = moe_tp[0] * ep[1] + ep[0]  # Mapping's order inside a TP group: moe_ep fastest
    mapping = Mapping(world_size=tp, rank=rank, tp=tp, moe_ep=ep[1])
    assert (mapping.moe_ep_rank, mapping.moe_tp_rank) == (ep[0], moe_tp[0])
    experts = FusedMoE(num_experts, top_k, hidden, inter, mapping, torch.float32)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=gen) * 0.2)
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=gen) * 0.2)
    return experts


@pytest.mark.parametrize("ep_rank", [0, 1, 3])
def test_expert_backends_agree_with_a_per_token_reference(ep_rank):
    experts = make_experts(ep=(ep_rank, 4))  # 2 local experts of 8: most pairs belong to other ranks
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(33, 64, generator=gen)
    weights, ids = route(torch.randn(33, 8, generator=gen), 3, renormalize=True)
    # From first principles: token by token, slot by slot.
    expected = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for slot in range(3):
            local = int(ids[t, slot]) - experts.expert_start
            if 0 <= local < experts.num_local_experts:
                gate, up = (experts.w13[local] @ hidden[t]).chunk(2)
                expected[t] += weights[t, slot] * (experts.w2[local] @ (torch.nn.functional.silu(gate) * up))
    assert expected.abs().sum() > 0
    for backend in ("loop", "grouped", "padded"):
        experts.backend = backend
        torch.testing.assert_close(experts(hidden, weights, ids), expected, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{backend}, ep rank {ep_rank}: {m}")


def test_long_prefills_run_in_chunks(monkeypatch):
    import meshlm.parallel.experts as experts_module
    experts = make_experts()
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(50, 64, generator=gen)
    weights, ids = route(torch.randn(50, 8, generator=gen), 3, renormalize=False)
    whole = experts(hidden, weights, ids)
    monkeypatch.setattr(experts_module, "MAX_PAIRS_PER_CHUNK", 3 * 16)  # 16 tokens per chunk
    torch.testing.assert_close(experts(hidden, weights, ids), whole, atol=1e-6, rtol=1e-6)


# --- checkpoint layouts ---------------------------------------------------------------------------

def fuse_experts(src, dst, cfg: ModelConfig) -> None:
    """Rewrite a per-expert checkpoint in transformers 5's fused layout (block ``mlp`` for every family)."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    mixtral = cfg.architecture == "MixtralForCausalLM"
    block, (gate, up, down) = (("block_sparse_moe", ("w1", "w3", "w2")) if mixtral
                               else ("mlp", ("gate_proj", "up_proj", "down_proj")))
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.{block}"

        def pop(kind):
            return torch.stack([tensors.pop(f"{p}.experts.{e}.{kind}.weight") for e in range(cfg.num_experts)])

        gate_up = torch.cat([pop(gate), pop(up)], dim=1)  # [E, 2 * inter, hidden]
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = pop(down)  # [E, hidden, inter]
        tensors[f"model.layers.{i}.mlp.gate.weight"] = tensors.pop(f"{p}.gate.weight")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_fused_expert_checkpoint_gives_the_same_tokens(family, tmp_path):
    per_expert = make_random_moe_model(tmp_path / "per-expert", family, seed=2)
    cfg = ModelConfig.from_dir(per_expert)
    fuse_experts(per_expert, tmp_path / "fused", cfg)
    assert "model.layers.0.mlp.experts.gate_up_proj" in CheckpointReader(tmp_path / "fused")
    prompts = random_prompts(cfg.vocab_size, (7, 21), seed=3)
    ref = [o.outputs[0].token_ids for o in generate(per_expert, prompts, max_tokens=8, logprobs=None)]
    got = [o.outputs[0].token_ids for o in generate(tmp_path / "fused", prompts, max_tokens=8, logprobs=None)]
    assert got == ref
    # And each rank of tp=4, moe_ep=2 cuts its experts and its width from the fused tensors.
    hidden = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    expected = load_block(per_expert, cfg, ParallelGroups.single())[0](hidden)
    total = sum(load_block(tmp_path / "fused", cfg, moe_rank_groups(4, 2, r))[0](hidden) for r in range(4))
    torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5)


def test_missing_expert_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    from meshlm.weights.checkpoint import CheckpointError
    path = make_random_moe_model(tmp_path / "m", "mixtral", seed=0, num_hidden_layers=1)
    name = "model.layers.0.block_sparse_moe.experts.5.w3.weight"
    tensors = load_file(path / "model.safetensors")
    tensors.pop(name)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.5\.w3\.weight.*\[32, 64\]"):
        LLM(str(path), **ENGINE_KW)


# --- configuration and layout errors --------------------------------------------------------------

def moe_config(**overrides) -> ModelConfig:
    fields = dict(architecture="Qwen2MoeForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    return ModelConfig(**{**fields, **overrides})


def layout(tp: int, ep: int | None) -> ParallelConfig:
    return EngineArgs(tensor_parallel_size=tp, moe_expert_parallel_size=ep).parallel_config()


def test_layouts_that_split_experts_and_width_pass():
    for tp, ep in [(1, None), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]:
        check_layout(moe_config(), layout(tp, ep))


def test_experts_not_divisible_by_ep_fail_with_every_number():
    with pytest.raises(ValueError) as err:
        check_layout(moe_config(num_experts=6), layout(4, 4))
    message = str(err.value)
    for part in ("moe_ep=4", "num_experts=6", "tp=4", "moe_tp=1", "[1, 2]"):
        assert part in message, message


def test_expert_width_not_divisible_by_moe_tp_fails_with_every_number():
    cfg = moe_config(moe_intermediate_size=34)
    with pytest.raises(ValueError) as err:
        check_layout(cfg, layout(4, 1))
    message = str(err.value)
    for part in ("moe_tp=4", "tp=4", "moe_ep=1", "moe_intermediate_size=34"):
        assert part in message, message
    check_layout(cfg, layout(4, 2))  # moe_tp=2 splits 34


def test_other_moe_layout_errors():
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide shared_expert_intermediate_size=66"):
        check_layout(moe_config(shared_expert_intermediate_size=66), layout(4, 4))
    dense = ModelConfig(architecture="LlamaForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
    with pytest.raises(ValueError, match="expert parallel size 2 .*LlamaForCausalLM has no experts"):
        check_layout(dense, layout(2, 2))
    with pytest.raises(ValueError, match="moe_expert_parallel_size=3 must divide tensor_parallel_size=4"):
        layout(4, 3)
    with pytest.raises(ValueError, match=r"num_experts_per_tok=9 must be in \[1, num_experts=8\]"):
        moe_config(num_experts_per_tok=9)


def test_config_reads_published_and_transformers_5_names():
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    qwen3 = ModelConfig.from_hf_dict({**base, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128,
                                      "num_experts_per_tok": 8, "moe_intermediate_size": 96,
                                      "norm_topk_prob": True})
    assert (qwen3.num_experts, qwen3.num_experts_per_tok, qwen3.moe_intermediate_size) == (128, 8, 96)
    assert qwen3.qk_norm and qwen3.norm_topk_prob and not qwen3.attention_bias
    qwen3_v5 = ModelConfig.from_hf_dict({**base, "architectures": ["Qwen3MoeForCausalLM"], "num_local_experts": 16,
                                         "num_experts_per_tok": 4, "moe_intermediate_size": 96})
    assert qwen3_v5.num_experts == 16 and not qwen3_v5.norm_topk_prob
    qwen2 = ModelConfig.from_hf_dict({**base, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 60,
                                      "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                                      "shared_expert_intermediate_size": 64, "decoder_sparse_step": 2,
                                      "mlp_only_layers": [2]})
    assert qwen2.attention_bias and qwen2.shared_expert_intermediate_size == 64  # Qwen1.5-MoE: biases
    assert [qwen2.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [qwen2.is_moe_layer(i) for i in (2,)] == [False] and qwen2.has_dense_layers
    mixtral = ModelConfig.from_hf_dict({**base, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
                                        "num_experts_per_tok": 2, "sliding_window": 4096})
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob) == (8, 128, True)
    assert mixtral.sliding_window == 4096 and not mixtral.has_dense_layers
