"""Tiny random-weight models in Hugging Face layout, built with transformers, for correctness tests.

    path = make_random_model(tmp_path / "m", "qwen3")          # config.json, model.safetensors, tokenizer
    hf = load_reference(path)                                    # the same weights in transformers, fp32
    tokens, logprobs = reference_greedy(hf, prompt, num_steps=16)

Every family exercises grouped-query attention (4 query heads over 2 KV heads) and what makes it
differ from plain Llama: llama3 rope scaling, tied embeddings, a sliding window, attention biases,
qk-norm with an explicit head_dim. Weights are drawn with a seed, and scaled up from transformers'
default init (std 0.02 gives nearly uniform logits, so greedy choices become ties and logit
differences say nothing); norm weights and biases are random too, so that a loader that skipped them
would be caught.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "make_random_model", "family_config", "load_reference", "make_tokenizer",
           "randomize_weights_", "random_prompts", "reference_greedy", "reference_logits"]

FAMILIES = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")

EOS_TOKEN_ID = 2
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2

# Shared by every family; small enough that a forward takes milliseconds on the CPU.
_BASE: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=EOS_TOKEN_ID,
    tie_word_embeddings=False,
)

_FAMILY: dict[str, tuple[str, dict[str, Any]]] = {
    # llama3 rope scaling with a short original context, so positions of a short test cross it.
    "llama": ("LlamaForCausalLM", dict(
        num_hidden_layers=3,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True)),
    # A window shorter than the test prompts plus their outputs, so the window masks something.
    "mistral": ("MistralForCausalLM", dict(sliding_window=16, rope_theta=1000.0)),
    "qwen2": ("Qwen2ForCausalLM", dict(use_sliding_window=False, rope_theta=1000000.0)),
    # head_dim 24 != hidden_size / num_heads = 16
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=24, attention_bias=False, use_sliding_window=False)),
}


def family_config(family: str, **overrides):
    """The transformers config object of a family, with ``overrides`` applied (e.g. vocab_size=...)."""
    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(_FAMILY)}")
    import transformers
    architecture, extra = _FAMILY[family]
    kwargs = {**_BASE, **extra, **overrides}
    config_cls = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_cls(**kwargs)
    config.architectures = [architecture]
    return config


def make_random_model(path: str | Path, family: str, *, seed: int = 0, sharded: bool = False,
                      weight_std: float | None = None, **overrides) -> Path:
    """Write a random-weight model of ``family`` (see FAMILIES) into ``path``; returns ``path``.

    ``overrides`` are config fields (``num_hidden_layers=1``, ``vocab_size=512`` ...). ``sharded``
    writes several safetensors files and ``model.safetensors.index.json``. ``weight_std`` of the
    weight matrices, None: ``1.6 / sqrt(hidden_size)`` (0.2 at hidden size 64), which keeps the
    spread of activations and logits the same at any width. The tokenizer has exactly
    ``vocab_size`` tokens, with ``</s>`` (id 2) as eos.
    """
    import transformers
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = family_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):  # transformers' own init must not move the caller's RNG
        model = getattr(transformers, config.architectures[0])(config).to(torch.float32).eval()
    if weight_std is None:
        weight_std = 1.6 / config.hidden_size ** 0.5
    randomize_weights_(model, seed=seed, std=weight_std)
    # A shard limit well under the model's size gives one file per few tensors.
    shard_size = "40KB" if sharded else "10GB"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size)
    if sharded and not (path / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors.index.json in {path}")
    make_tokenizer(path, config.vocab_size)
    return path


@torch.no_grad()
def randomize_weights_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Redraw every parameter: matrices ~ N(0, std), norm weights ~ U(0.5, 1.5), biases ~ N(0, 0.5).

    std=0.2 on hidden size 64 gives logits with a spread of a few units: distinct greedy choices.
    """
    gen = torch.Generator().manual_seed(seed + 12345)
    for name, param in model.named_parameters():  # tied parameters appear once
        if "norm" in name:
            param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
        elif name.endswith(".bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def make_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A word-level tokenizer of exactly ``vocab_size`` tokens: ``<unk> <s> </s> w3 w4 ...``.

    Writes tokenizer.json and tokenizer_config.json (eos ``</s>``, bos ``<s>``, no chat template).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    if vocab_size <= len(_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(_SPECIAL_TOKENS)} special tokens")
    path = Path(path)
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(_SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True) for t in _SPECIAL_TOKENS])
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 512}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_reference(path: str | Path):
    """The transformers model stored in ``path``: fp32, eval mode, eager attention on the CPU."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def random_prompts(vocab_size: int, lengths, seed: int = 1) -> list[list[int]]:
    """Prompts of token ids, one per length, avoiding the special ids 0-2."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(len(_SPECIAL_TOKENS), vocab_size, size=n).tolist() for n in lengths]


def reference_greedy(hf_model, prompt: list[int], num_steps: int,
                     use_cache: bool = True) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ``generate``: its tokens, and log_softmax of its raw logits at each step.

    Returns (``num_steps`` token ids, float32 [num_steps, vocab]). It never stops at eos, as meshlm
    with ``ignore_eos=True``. ``use_cache=False`` runs the whole sequence at every step.
    """
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=num_steps, do_sample=False, use_cache=use_cache,
                            eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    if len(tokens) != num_steps:
        raise RuntimeError(f"transformers stopped after {len(tokens)} of {num_steps} tokens")
    logits = torch.cat(out.logits, dim=0).float()  # [num_steps, vocab]
    return tokens, torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits at every position of one sequence: float32 [len(token_ids), vocab]."""
    return hf_model(torch.tensor([token_ids])).logits[0].float()


# --- mixture-of-experts families ---------------------------------------------------------------
# Eight small experts (width 32, divisible by moe_tp up to 4), hidden 64 as above. Each family adds
# what sets it apart: Mixtral renormalises its top 2; Qwen2-MoE keeps raw top-k probabilities, adds
# a sigmoid-gated shared expert and attention biases, and keeps a dense MLP on layer 1; Qwen3-MoE
# renormalises its top 3, has qk-norm and an explicit head_dim.
MOE_FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe")

_FAMILY.update({
    "mixtral": ("MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                           rope_theta=1000000.0)),
    "qwen2-moe": ("Qwen2MoeForCausalLM", dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[1],
        use_sliding_window=False)),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(
        num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True, head_dim=24,
        attention_bias=False, use_sliding_window=False)),
})


def make_random_moe_model(path: str | Path, family: str, *, seed: int = 0, **overrides) -> Path:
    """``make_random_model`` for a family of MOE_FAMILIES (``num_experts=4``, ... as overrides)."""
    if family not in MOE_FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; choose one of {', '.join(MOE_FAMILIES)}")
    return make_random_model(path, family, seed=seed, **overrides)


def load_moe_reference(path: str | Path):
    """``load_reference`` with transformers' eager experts (a Python loop over the experts hit), so the
    reference does not share ``grouped_mm`` with meshlm's grouped path."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager")
    if model.config._experts_implementation != "eager":
        raise RuntimeError(f"transformers chose experts_implementation={model.config._experts_implementation!r}")
    return model.eval()


# --- published FP8 checkpoints ----------------------------------------------------------------
# Written here with torch and safetensors alone (compressed-tensors' own QuantizationConfig writes
# that format's config), so that meshlm's reader is checked against files it did not write.
FP8_FORMATS = ("hf-fp8", "hf-fp8-static", "hf-fp8-block", "ct-channel", "ct-tensor-static")
_FP8_MAX = 448.0


def is_fp8_linear_weight(name: str) -> bool:
    """The decoder's linear weights a published FP8 checkpoint stores in float8 (not routers, norms,
    embeddings or the LM head)."""
    import re
    return name.startswith("model.layers.") and bool(
        re.search(r"(_proj|experts\.\d+\.w[123])\.weight$", name)) and "shared_expert_gate" not in name


def _fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)


def least_error_row_scales(w: torch.Tensor, num_candidates: int = 16) -> torch.Tensor:
    """One scale per row of ``w`` [..., K] -> [..., 1]: of ``amax * (2 ** (k / num_candidates) / 448)``,
    k = 0 .. num_candidates - 1, the one whose float8 rounding of the row has the least squared error
    (the first such k on a tie): how meshlm scales weights it quantizes."""
    w = w.float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    factors = torch.tensor([2.0 ** (k / num_candidates) / _FP8_MAX for k in range(num_candidates)])  # float32
    candidates = torch.stack([(amax * f).clamp(min=1e-12) for f in factors.tolist()])  # [C, ..., 1]
    errors = torch.stack([((_fp8(w, s).float() * s - w).double() ** 2).sum(-1, keepdim=True)
                          for s in candidates])  # [C, ..., 1]
    return candidates.gather(0, errors.argmin(dim=0, keepdim=True))[0]


def _block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    bn, bk = block
    rows, cols = w.shape
    scales = torch.empty(-(-rows // bn), -(-cols // bk))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            scales[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().amax().float() / _FP8_MAX
    per_element = scales.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
    return _fp8(w, per_element), scales


def calibrate_input_amax(path: str | Path, prompts: list[list[int]]) -> dict[str, float]:
    """The largest |input| each decoder linear layer of the transformers model in ``path`` sees over
    ``prompts`` (what a static activation scale is calibrated from)."""
    model = load_reference(path)
    amax: dict[str, float] = {}

    def hook(name):
        return lambda module, args: amax.__setitem__(name, max(amax.get(name, 0.0), float(args[0].abs().max())))

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and is_fp8_linear_weight(n + ".weight")]
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([prompt]))
    for h in handles:
        h.remove()
    return amax


def _fp8_tensors(name: str, w: torch.Tensor, fmt: str, block, input_amax) -> dict[str, torch.Tensor]:
    module = name.removesuffix(".weight")
    if fmt == "hf-fp8-block":
        q, scales = _block_quantize(w, block)
        return {name: q, f"{module}.weight_scale_inv": scales}
    if fmt == "ct-channel":
        scale = least_error_row_scales(w)  # [N, 1]
        return {name: _fp8(w, scale), f"{module}.weight_scale": scale}
    scale = w.abs().amax().float() / _FP8_MAX
    out = {name: _fp8(w, scale), f"{module}.weight_scale": scale.reshape(() if fmt.startswith("hf") else (1,))}
    if fmt.endswith("static"):
        input_scale = torch.tensor(max(input_amax.get(module, 1.0), 1e-6) / _FP8_MAX)
        out[f"{module}.input_scale"] = input_scale.reshape(() if fmt.startswith("hf") else (1,))
    return out


def _fp8_quantization_config(fmt: str, block, ignore: list[str]) -> dict[str, Any]:
    if fmt.startswith("hf"):
        cfg = {"quant_method": "fp8", "activation_scheme": "static" if fmt.endswith("static") else "dynamic",
               "ignored_layers": ["lm_head", *ignore]}
        if fmt == "hf-fp8-block":
            cfg["weight_block_size"] = list(block)
        return cfg
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    scheme = preset_name_to_scheme("FP8_DYNAMIC" if fmt == "ct-channel" else "FP8", ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$", *ignore],
                                format="float-quantized", quantization_status="compressed")
    return json.loads(config.model_dump_json(exclude_none=False))


def write_fp8_checkpoint(src: str | Path, dst: str | Path, fmt: str, block: tuple[int, int] = (16, 16),
                         calibration_prompts: list[list[int]] | None = None, ignore: list[str] = ()) -> Path:
    """Copy the model in ``src`` to ``dst`` with its decoder's linear weights in a published FP8
    format (see FP8_FORMATS): Hugging Face ``quant_method: fp8`` per tensor (``-static``: with input
    scales calibrated on ``calibration_prompts``) or in ``block`` blocks, compressed-tensors per
    channel, or per tensor with static input scales. Modules named by ``ignore`` or inside one
    (``model.layers.0``) keep their weights as they are, and the config lists them as not quantized."""
    import shutil
    from safetensors.torch import load_file, save_file
    if fmt not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; choose one of {', '.join(FP8_FORMATS)}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    input_amax = calibrate_input_amax(src, calibration_prompts or [[3, 4, 5]]) if fmt.endswith("static") else {}
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        for name, w in load_file(file).items():
            is_kept = any(name.startswith(module + ".") for module in ignore)
            tensors.update(_fp8_tensors(name, w, fmt, block, input_amax)
                           if is_fp8_linear_weight(name) and not is_kept else {name: w})
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _fp8_quantization_config(fmt, block, list(ignore))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return dst
