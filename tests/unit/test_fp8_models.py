"""FP8 models on the CPU: quantized at load and read from published FP8 checkpoints.

The reference is transformers on the same weights with every decoder linear layer replaced by the
FP8 product as its definition says, written here from first principles: float8 weights with one
scale per output row (the checkpoint's, else the candidate scale of least rounding error,
tests/model_factory.py's least_error_row_scales), activations quantized per token (or with the
checkpoint's static scale), the float32 sums scaled by both; in steps of at most
``WEIGHT_ONLY_MAX_ROWS`` rows (meshlm's decode steps of these prompts) the activations are not
quantized and the float32 sums take the weight's scale only. meshlm must give
the reference's greedy tokens and logprobs to float32 precision, in every format. Beside it: the
unquantized model stays close, scales that are missing or mis-shaped fail before loading, and the
layers that must keep the model dtype keep it.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from meshlm import LLM, SamplingParams
from meshlm.config import EngineArgs, EngineConfig
from meshlm.executor.model_runner import ModelRunner
from meshlm.kernels import fp8
from meshlm.kernels.fp8 import WEIGHT_ONLY_MAX_ROWS
from meshlm.kernels.fused_ops import TorchOps
from meshlm.parallel.experts import route
from meshlm.parallel.groups import ParallelGroups
from meshlm.weights.checkpoint import CheckpointError
from meshlm.weights.model_config import ModelConfig
from tests.model_factory import (FP8_FORMATS, is_fp8_linear_weight, least_error_row_scales, load_reference,
                                 make_random_model, make_random_moe_model, random_prompts, reference_greedy,
                                 write_fp8_checkpoint)

pytest.importorskip("compressed_tensors")

NUM_STEPS = 12
ENGINE_KW = dict(num_kv_blocks=64, block_size=16, max_model_len=256, dtype="float32")
PROMPT_LENGTHS = (5, 19, 37)
ATOL = 2e-5
E4M3_MAX = 448.0


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def _fp8_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Activations quantized with their rows' scales: times the scale's reciprocal, as vLLM does."""
    return (x.float() * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def _row_quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = least_error_row_scales(w)  # [N, 1]
    return _fp8(w, scale), scale


def _checkpoint_rows(tensors: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values as float32 [N, K], scale per row [N, 1]) of ``module`` in a checkpoint's tensors."""
    w = tensors[f"{module}.weight"]
    if w.dtype != torch.float8_e4m3fn:
        return _row_quantized(w)
    if f"{module}.weight_scale_inv" in tensors:  # 16 x 16 blocks: dequantized, then one scale per row
        blocks = tensors[f"{module}.weight_scale_inv"]
        per_element = blocks.repeat_interleave(16, 0)[:w.shape[0]].repeat_interleave(16, 1)[:, :w.shape[1]]
        return _row_quantized(w.float() * per_element)
    scale = tensors[f"{module}.weight_scale"].float()
    return w.float(), scale.reshape(-1, 1).expand(w.shape[0], 1) if scale.numel() == 1 else scale.reshape(-1, 1)


def fp8_reference(base, checkpoint=None):
    """transformers on ``base``'s weights with every decoder linear layer computing the FP8 product of
    ``checkpoint``'s float8 weights (None: ``base``'s quantized per row). meshlm prefills the prompts
    in one step of PREFILL_ROWS rows (activations quantized) and decodes them in steps of
    len(PROMPTS) rows (not quantized); transformers runs one prompt at a time, so its forward over a
    whole prompt stands for the first and its forward over one position for the second."""
    hf = load_reference(base)
    tensors = load_file(f"{checkpoint or base}/model.safetensors")
    for name, module in hf.named_modules():
        if not (isinstance(module, torch.nn.Linear) and is_fp8_linear_weight(f"{name}.weight")):
            continue
        w_q, w_scale = _checkpoint_rows(tensors, name)
        static = tensors.get(f"{name}.input_scale")

        def forward(x, w_q=w_q, w_scale=w_scale.reshape(-1), static=static, bias=module.bias):
            scale = static.float() if static is not None else x.abs().amax(-1, keepdim=True).float() / E4M3_MAX
            x_q = _fp8(x, scale) if static is not None else _fp8_rows(x, scale)
            quantized = (x_q @ w_q.t()) * scale * w_scale  # [1, T, N]
            plain = (x.float() @ w_q.t()) * w_scale  # decode positions: activations as they are
            y = torch.where(_decode_positions(hf, x.shape[-2])[:, None], plain, quantized)
            return y if bias is None else y + bias

        module.forward = forward
    hf.fp8_decode_from = None  # set to a prompt's length when the reference reruns whole sequences
    return hf


def _decode_positions(hf, num_positions: int) -> torch.Tensor:
    """[num_positions] bool: the positions meshlm computes in decode steps. With transformers'
    cache a forward of one position is a decode; without it (whole sequences), the positions from
    ``hf.fp8_decode_from`` on. Activations are quantized per position, so a row's product does not
    depend on the other rows."""
    first = hf.fp8_decode_from
    if first is None:
        first = 0 if num_positions == 1 else num_positions
    return torch.arange(num_positions) >= first


def generate(path, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=NUM_STEPS, ignore_eos=True, logprobs=20)
    with LLM(str(path), **ENGINE_KW, **kw) as llm:
        return [o.outputs[0] for o in llm.generate(PROMPTS, params)]


# How far apart two tokens' logprobs may be for a float8 rounding flip to swap them.
NEAR_TIE = 0.1


def assert_matches_reference(outputs, hf, what: str, atol: float = ATOL):
    """meshlm's greedy tokens and logprobs equal the reference's to ``atol``, step by step, until
    a step where the reference itself had a near tie. Float8 rounding is discontinuous: two
    correct attentions differ in their last bits, and an activation that lies at a float8 rounding
    boundary then rounds to neighbouring values, which moves the logprobs by ~1e-2 in a random
    model. Past the prompt, the paths may part there, as vLLM's logprob comparisons allow (the
    reference runs without transformers' KV cache, whose decode attention parts earlier still)."""
    for prompt, out in zip(PROMPTS, outputs):
        hf.fp8_decode_from = len(prompt)
        ref_tokens, ref_logprobs = reference_greedy(hf, prompt, NUM_STEPS, use_cache=False)
        hf.fp8_decode_from = None
        where = f"{what}, prompt of {len(prompt)} tokens"
        for step, entry in enumerate(out.logprobs):
            ids, values = torch.tensor(list(entry)), torch.tensor(list(entry.values()))
            if step > 0 and (values - ref_logprobs[step][ids]).abs().max() > atol:
                best = ref_logprobs[step].max()
                assert best - ref_logprobs[step][out.token_ids[step]] < NEAR_TIE, f"{where}: parts at step {step}"
                assert 0 < best - ref_logprobs[step].topk(2).values[1] < NEAR_TIE, f"{where}: no near tie at {step}"
                break
            assert out.token_ids[step] == ref_tokens[step], f"{where}, step {step}"
            torch.testing.assert_close(values, ref_logprobs[step][ids], atol=atol, rtol=0,
                                       msg=lambda m: f"{where}, step {step}: {m}")


PROMPTS = random_prompts(320, PROMPT_LENGTHS, seed=1)
PREFILL_ROWS = sum(PROMPT_LENGTHS)


def test_prefill_quantizes_activations_and_decode_does_not():
    """What fp8_reference assumes of the step sizes."""
    assert len(PROMPTS) <= WEIGHT_ONLY_MAX_ROWS < PREFILL_ROWS


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_quantized_at_load_matches_the_fp8_reference(family, llama, tmp_path):
    base = llama if family == "llama" else make_random_model(tmp_path / family, family, seed=0)
    assert_matches_reference(generate(base, quantization="fp8"), fp8_reference(base), f"{family} fp8")


@pytest.mark.parametrize("fmt", FP8_FORMATS)
def test_published_checkpoint_matches_the_fp8_reference(fmt, llama, tmp_path):
    path = write_fp8_checkpoint(llama, tmp_path / fmt, fmt, calibration_prompts=PROMPTS)
    assert_matches_reference(generate(path), fp8_reference(llama, path), fmt)


def test_per_channel_checkpoint_gives_the_tokens_of_quantizing_at_load(llama, tmp_path):
    path = write_fp8_checkpoint(llama, tmp_path / "ct", "ct-channel")
    published, at_load = generate(path), generate(llama, quantization="fp8")
    assert [o.token_ids for o in published] == [o.token_ids for o in at_load]
    assert [o.cumulative_logprob for o in published] == [o.cumulative_logprob for o in at_load]


class QuantizedOpsCounter(TorchOps):
    """The torch ops, counting the calls of the forms that hand quantized rows to an FP8 product."""

    def __init__(self):
        self.calls = {"add_rms_norm_quantized": 0, "silu_and_mul_quantized": 0}

    def add_rms_norm_quantized(self, x, residual, weight, eps):
        self.calls["add_rms_norm_quantized"] += 1
        return super().add_rms_norm_quantized(x, residual, weight, eps)

    def silu_and_mul_quantized(self, gate_up):
        self.calls["silu_and_mul_quantized"] += 1
        return super().silu_and_mul_quantized(gate_up)


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_fused_quantization_gives_the_outputs_of_the_unfused_model(family, tmp_path, monkeypatch):
    """With the fusion on, the norms and SiLU-and-mul hand quantized rows to the FP8 products of the
    prefill step (PREFILL_ROWS rows), and to no decode step (weight-only products) nor expert (the
    router reads the model dtype); the CPU's ops quantize as the products would, so the tokens and
    logprobs are the unfused model's exactly. Qwen2: a bias after the product of quantized rows."""
    make = make_random_moe_model if family == "mixtral" else make_random_model
    base = make(tmp_path / family, family, seed=5)
    counting = QuantizedOpsCounter()
    monkeypatch.setattr("meshlm.executor.model_runner.select_ops", lambda enabled, device: counting)
    try:
        fused = generate(base, quantization="fp8")
        calls = dict(counting.calls)
        fp8.set_fused_quantization(False)
        unfused = generate(base, quantization="fp8")
    finally:
        fp8.set_fused_quantization(True)
    num_layers = ModelConfig.from_dir(base).num_layers
    # One prefill step: each layer's input norm (qkv), and for a dense MLP its post-attention norm
    # (gate_up) and SiLU-and-mul (down).
    dense = family != "mixtral"
    assert calls == {"add_rms_norm_quantized": num_layers * (2 if dense else 1),
                     "silu_and_mul_quantized": num_layers if dense else 0}
    assert counting.calls == calls, "the fusion turned off still fused"
    assert [o.token_ids for o in fused] == [o.token_ids for o in unfused]
    assert [o.logprobs for o in fused] == [o.logprobs for o in unfused]


# Random test models amplify any change of their weights (near-uniform logits, greedy ties), the
# more so the larger the weights: the closeness tests use weights of std 0.05, and compare the
# logprobs after the prompt, before greedy paths can part.
CLOSE_STD = 0.05
CLOSE_TOL = 0.1


def assert_close_to_unquantized(base, what: str):
    fp8_out, ref_out = generate(base, quantization="fp8"), generate(base)
    for got, ref in zip(fp8_out, ref_out):
        common = set(ref.logprobs[0]) & set(got.logprobs[0])
        assert len(common) >= 15, what
        diff = max(abs(got.logprobs[0][t] - ref.logprobs[0][t]) for t in common)
        assert 0 < diff < CLOSE_TOL, f"{what}: top-20 logprobs after the prompt differ by up to {diff}"


def test_fp8_stays_close_to_the_unquantized_model(tmp_path):
    assert_close_to_unquantized(make_random_model(tmp_path / "m", "llama", seed=5, weight_std=CLOSE_STD), "llama")


def test_embedding_norms_and_lm_head_keep_the_model_dtype(llama):
    config = EngineConfig.from_args(EngineArgs(str(llama), quantization="fp8", dtype="float32", max_model_len=256))
    model = ModelRunner(config, ParallelGroups.single(), torch.device("cpu")).model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    fp8 = {n for n, d in dtypes.items() if d == torch.float8_e4m3fn}
    assert fp8 and all(n.endswith(("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight"))
                       for n in fp8), fp8
    assert len(fp8) == 4 * config.model.num_layers
    assert dtypes["embed_tokens.weight"] == dtypes["lm_head.weight"] == dtypes["norm.weight"] == torch.float32
    assert all(dtypes[n.replace(".weight", ".weight_scale")] == torch.float32 for n in fp8)


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_and_misshapen_scales_fail_before_loading(llama, tmp_path):
    path = write_fp8_checkpoint(llama, tmp_path / "ct", "ct-channel")
    missing = "model.layers.1.mlp.down_proj.weight_scale"
    wrong = "model.layers.0.self_attn.k_proj.weight_scale"

    def edit(tensors):
        tensors.pop(missing)
        assert list(tensors[wrong].shape) == [32, 1]  # 2 kv heads x head_dim 16 rows
        tensors[wrong] = torch.ones(16, 1)

    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as err:
        LLM(str(path), **ENGINE_KW)
    message = str(err.value)
    assert f"missing tensor {missing!r} (expected shape [64] or [64, 1])" in message, message
    assert f"tensor {wrong!r} has shape [16, 1], the config implies [32] or [32, 1]" in message, message


def test_float8_checkpoint_weight_in_another_dtype_is_named(llama, tmp_path):
    path = write_fp8_checkpoint(llama, tmp_path / "ct", "ct-channel")
    name = "model.layers.2.mlp.up_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has dtype torch.float32"):
        LLM(str(path), **ENGINE_KW)


def test_compressed_tensors_asked_of_an_unquantized_checkpoint_says_so(llama):
    with pytest.raises(ValueError, match="no quantization_config; quantization='fp8' quantizes at load"):
        LLM(str(llama), quantization="compressed-tensors", **ENGINE_KW)


def test_random_weights_are_quantized_at_load(llama, tmp_path):
    fp8_dir = write_fp8_checkpoint(llama, tmp_path / "hf", "hf-fp8-static")
    for model in (ModelConfig.from_dir(llama), ModelConfig.from_dir(fp8_dir)):
        config = EngineConfig.for_random_weights(model, quantization="fp8", dtype="float32", max_model_len=64)
        assert config.model.quantization.checkpoint_format is None
        runner = ModelRunner(config, ParallelGroups.single(), torch.device("cpu"))
        layer = runner.model.layers["0"].self_attn.qkv_proj
        assert layer.weight.dtype == torch.float8_e4m3fn and bool((layer.weight_scale > 0).all())


# --- experts -----------------------------------------------------------------------------------------

def test_fp8_experts_follow_the_per_token_definition(tmp_path):
    """Qwen3-MoE's experts in FP8, each expert layout of 4 ranks summed, and both CPU backends."""
    from meshlm.models.moe import SparseMoeBlock
    from meshlm.parallel.mapping import Mapping
    from meshlm.weights.checkpoint import CheckpointReader
    from meshlm.weights.quantization import QuantizationConfig
    from tests.rank_groups import rank_groups
    import dataclasses
    path = make_random_moe_model(tmp_path / "m", "qwen3-moe", seed=3, num_hidden_layers=1)
    cfg = dataclasses.replace(ModelConfig.from_dir(path), quantization=QuantizationConfig.at_load())
    tensors = load_file(path / "model.safetensors")
    hidden = torch.randn(21, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    weights, ids = route(hidden @ tensors["model.layers.0.mlp.gate.weight"].T, cfg.num_experts_per_tok, True)
    expected = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for slot in range(cfg.num_experts_per_tok):
            p = f"model.layers.0.mlp.experts.{int(ids[t, slot])}"
            def linear(x, n, p=p):
                w_q, w_scale = _row_quantized(tensors[f"{p}.{n}.weight"])
                scale = x.abs().amax() / E4M3_MAX
                return (_fp8_rows(x, scale) @ w_q.t()) * scale * w_scale[:, 0]
            h = torch.nn.functional.silu(linear(hidden[t:t + 1], "gate_proj")) * linear(hidden[t:t + 1], "up_proj")
            expected[t] += weights[t, slot] * linear(h, "down_proj")[0]
    for tp, moe_ep in ((1, 1), (4, 4)):
        for backend in ("loop", "padded"):
            total = torch.zeros_like(hidden)
            for rank in range(tp):
                block = SparseMoeBlock(cfg, rank_groups(Mapping(world_size=tp, rank=rank, tp=tp, moe_ep=moe_ep)),
                                       torch.float32, "cpu", "model.layers.0")
                reader = CheckpointReader(path)
                reader.check(block.expected_shapes("model.layers.0"))
                block.load(reader, "model.layers.0")
                block.experts.backend = backend
                total += block.experts(hidden, weights, ids)
            torch.testing.assert_close(total, expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"tp={tp} moe_ep={moe_ep} {backend}: {m}")


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_moe_in_fp8_stays_close_to_the_unquantized_model(family, tmp_path):
    assert_close_to_unquantized(make_random_moe_model(tmp_path / family, family, seed=5, weight_std=CLOSE_STD),
                                family)


def test_moe_per_expert_fp8_checkpoint_loads(tmp_path):
    base = make_random_moe_model(tmp_path / "m", "mixtral", seed=5)
    path = write_fp8_checkpoint(base, tmp_path / "ct", "ct-channel")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    published, at_load = generate(path), generate(base, quantization="fp8")
    assert [o.token_ids for o in published] == [o.token_ids for o in at_load]
    shutil.rmtree(path)
