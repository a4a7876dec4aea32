"""Layers a quantization_config lists as not quantized keep the model dtype, in published FP8
checkpoints and when quantizing at load (``hf_overrides``, vLLM's way of choosing them).

A random Llama of 3 decoder layers: its first layer, and the last one's MLP, are left out of FP8.
The published compressed-tensors checkpoint per channel stores them in float32 and lists them in
``ignore``; quantizing the original at load with the same list through ``hf_overrides`` must give
the same model, parameter for parameter, and the same tokens and logprobs.
"""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from meshlm import LLM, SamplingParams
from meshlm.config import EngineArgs, EngineConfig
from meshlm.executor.model_runner import ModelRunner
from meshlm.parallel.groups import ParallelGroups
from meshlm.weights.checkpoint import CheckpointError
from meshlm.weights.quantization import QuantizationConfig
from tests.model_factory import make_random_model, random_prompts, write_fp8_checkpoint

pytest.importorskip("compressed_tensors")

IGNORED = ["model.layers.0", "model.layers.2.mlp"]
ENGINE_KW = dict(num_kv_blocks=32, block_size=16, max_model_len=128, dtype="float32")
OVERRIDES = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "ignored_layers": IGNORED}}
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=3, weight_std=0.05)


def build(path, **kw):
    config = EngineConfig.from_args(EngineArgs(str(path), **ENGINE_KW, **kw))
    return ModelRunner(config, ParallelGroups.single(), torch.device("cpu")).model


def linear_dtypes(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters() if name.endswith("_proj.weight")}


def test_matching_names_dotted_parts_and_patterns():
    quant = QuantizationConfig.at_load(("model.layers.1", "re:.*\\.2\\.self_attn\\.o_proj$", "lm_head"))
    assert quant.for_layer(["model.layers.1.mlp.down_proj"]) is None
    assert quant.for_layer(["model.layers.10.mlp.down_proj"]) is quant  # layers.1 is not layers.10
    assert quant.for_layer(["model.layers.2.self_attn.o_proj"]) is None
    assert quant.for_layer(["model.layers.12.self_attn.o_proj"]) is quant  # re.match: from the start
    qkv = [f"model.layers.3.self_attn.{x}_proj" for x in "qkv"]
    with pytest.raises(ValueError) as err:
        QuantizationConfig.at_load(("model.layers.3.self_attn.q_proj",)).for_layer(qkv)
    assert f"lists {qkv[:1]} as not quantized but not {qkv[1:]}" in str(err.value), str(err.value)


def test_compressed_tensors_targets_decide_what_is_quantized():
    weights = {"num_bits": 8, "type": "float", "strategy": "channel"}
    quant = QuantizationConfig.from_hf({"quant_method": "compressed-tensors", "config_groups": {
        "attention": {"targets": ["re:.*self_attn\\.(q|k|v|o)_proj$"], "weights": weights},
        "layer_3": {"targets": ["model.layers.3"], "weights": weights}}})
    assert quant.for_layer(["model.layers.0.self_attn.o_proj"]) is quant
    assert quant.for_layer(["model.layers.0.mlp.down_proj"]) is None
    assert quant.for_layer(["model.layers.3.mlp.down_proj"]) is quant
    assert quant.as_at_load().for_layer(["model.layers.0.mlp.down_proj"]) is None  # random weights alike


def test_ignored_layers_of_a_published_checkpoint_keep_the_model_dtype(llama, tmp_path):
    path = write_fp8_checkpoint(llama, tmp_path / "ct", "ct-channel", ignore=IGNORED)
    model = build(path)
    dtypes = linear_dtypes(model)
    kept = {n for n, d in dtypes.items() if d == torch.float32}
    assert kept == {"layers.0.self_attn.qkv_proj.weight", "layers.0.self_attn.o_proj.weight",
                    "layers.0.mlp.gate_up_proj.weight", "layers.0.mlp.down_proj.weight",
                    "layers.2.mlp.gate_up_proj.weight", "layers.2.mlp.down_proj.weight"}, kept
    assert all(d == FP8 for n, d in dtypes.items() if n not in kept)
    tensors = load_file(llama / "model.safetensors")
    assert torch.equal(model.layers["2"].mlp.down_proj.weight, tensors["model.layers.2.mlp.down_proj.weight"])
    assert model.layers["0"].mlp.down_proj.weight_scale is None


def test_hf_overrides_choose_the_layers_left_unquantized_at_load(llama, tmp_path):
    """The same parameters and outputs as the published checkpoint that stores them so."""
    published = build(write_fp8_checkpoint(llama, tmp_path / "ct", "ct-channel", ignore=IGNORED))
    for kw in ({"quantization": "fp8", "hf_overrides": OVERRIDES}, {"hf_overrides": json.dumps(OVERRIDES)}):
        at_load = build(llama, **kw)
        assert linear_dtypes(at_load) == linear_dtypes(published)
        for (name, p), (_, q) in zip(at_load.named_parameters(), published.named_parameters()):
            assert torch.equal(p.float(), q.float()), name
    prompts = random_prompts(320, (7, 23), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
    outs = []
    for path, kw in ((tmp_path / "ct", {}), (llama, {"quantization": "fp8", "hf_overrides": OVERRIDES})):
        with LLM(str(path), **ENGINE_KW, **kw) as llm:
            outs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]


def test_a_merged_layer_listed_in_part_is_refused_by_name(llama):
    overrides = {"quantization_config": {"quant_method": "fp8", "ignored_layers": ["model.layers.1.mlp.up_proj"]}}
    with pytest.raises(ValueError) as err:
        build(llama, quantization="fp8", hf_overrides=overrides)
    assert ("['model.layers.1.mlp.up_proj'] as not quantized but not ['model.layers.1.mlp.gate_proj']"
            in str(err.value)), str(err.value)


def test_a_float8_weight_in_an_ignored_layer_is_named(llama, tmp_path):
    path = write_fp8_checkpoint(llama, tmp_path / "ct", "ct-channel")  # every layer float8
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"].append("model.layers.1.self_attn.o_proj")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.o_proj.weight' is float8 e4m3"):
        build(path)


@pytest.mark.parametrize("text, words", [
    ("{not json", ["hf_overrides is not valid JSON", "{not json"]),
    ("[1, 2]", ["hf_overrides must be a JSON object", "[1, 2]"]),
])
def test_hf_overrides_from_the_cli_are_checked(text, words):
    with pytest.raises(ValueError) as err:
        EngineArgs(hf_overrides=text)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_hf_overrides_flag_round_trips_and_merges_into_config_json(llama):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    text = json.dumps({"max_position_embeddings": 96, "quantization_config": {"quant_method": "fp8"}})
    args = EngineArgs.from_cli(parser.parse_args(["--model", str(llama), "--hf-overrides", text]))
    cli = args.to_cli()
    assert cli[cli.index("--hf-overrides") + 1] == text
    model = EngineConfig.from_args(args).model
    assert model.max_position_embeddings == 96 and model.quantization == QuantizationConfig.at_load()
    with pytest.raises(ValueError, match="hf_overrides must be a dict"):
        EngineArgs(hf_overrides=[("a", 1)])


@pytest.mark.parametrize("extra, words", [
    ({"activation_scheme": "static"}, ["static input activations", "use activation_scheme 'dynamic'"]),
    ({"weight_block_size": [16, 16]}, ["weight_block_size=[16, 16]", "one scale per output channel"]),
])
def test_at_load_overrides_that_need_float8_files_are_refused(llama, extra, words):
    overrides = {"quantization_config": {"quant_method": "fp8", **extra}}
    with pytest.raises(ValueError) as err:
        EngineConfig.from_args(EngineArgs(str(llama), hf_overrides=overrides))
    assert all(w in str(err.value) for w in words), str(err.value)
