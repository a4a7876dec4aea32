"""The model's shape, read from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshlm.weights.quantization import QuantizationConfig

# rope_type values of config.json that meshlm rotates by (kernels/rope_scaling.py); "default" is none.
SUPPORTED_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")

# Hugging Face architecture name -> meshlm model family module.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "moe",
    "Qwen2MoeForCausalLM": "moe",
    "Qwen3MoeForCausalLM": "moe",
}


@dataclass(slots=True)
class ModelConfig:
    """The model's shape, read from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    sliding_window: int | None = None
    # Mixture of experts (num_experts == 0: a dense model; the fields below then do not apply).
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int | None = None  # width of one expert's MLP
    norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert; 0: none
    decoder_sparse_step: int = 1  # layer i is an MoE layer when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    # FP8 linear layers: from config.json's quantization_config, or quantization="fp8" (EngineConfig)
    quantization: QuantizationConfig | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; meshlm supports "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.json: {name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.json: num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if self.num_experts:
            self._check_moe()

    def _check_moe(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"config.json: num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"[1, num_experts={self.num_experts}]")
        if self.moe_intermediate_size is None or self.moe_intermediate_size < 1:
            raise ValueError(f"config.json: moe_intermediate_size={self.moe_intermediate_size} must be >= 1 "
                             f"for a model of {self.num_experts} experts")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"config.json: decoder_sparse_step={self.decoder_sparse_step} must be >= 1")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (global index) has experts rather than a dense MLP."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_quantization(self, modules: list[str]) -> QuantizationConfig | None:
        """How the layer merging the checkpoint modules ``modules`` is quantized (None: not at all)."""
        return None if self.quantization is None else self.quantization.for_layer(modules)

    def with_quantization(self, quantization: str | None, load_format: str) -> "ModelConfig":
        """This model with the quantization it runs with: the checkpoint's own (FP8 checkpoints are read
        as they are), else FP8 quantized at load when ``quantization`` asks; random weights are always
        drawn in high precision and quantized at load. Ignored modules stay ignored."""
        if self.quantization is None and quantization is None:
            return self
        if quantization == "compressed-tensors" and self.quantization is None and load_format != "random":
            raise ValueError("quantization='compressed-tensors' reads a compressed-tensors checkpoint, and this "
                             "model's config.json has no quantization_config; quantization='fp8' quantizes at load")
        if self.quantization is None:
            return replace(self, quantization=QuantizationConfig.at_load())
        if load_format == "random":
            return replace(self, quantization=self.quantization.as_at_load())
        return self

    @property
    def has_dense_layers(self) -> bool:
        return not all(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def derived_max_model_len(self) -> int:
        """The longest context the model supports: ``max_position_embeddings``, stretched by the
        rope factor for the types whose config keeps the pre-training length there (linear,
        dynamic; yarn: ``factor`` x its original length). llama3 configs already give the long one."""
        scaling = self.rope_scaling
        if scaling is None or scaling["rope_type"] == "llama3":
            return self.max_position_embeddings
        if scaling["rope_type"] == "yarn":
            return int(scaling["original_max_position_embeddings"] * scaling["factor"])
        return int(self.max_position_embeddings * scaling["factor"])

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs:
            raise ValueError("config.json has no 'architectures' entry; cannot tell the model family")
        arch = archs[0]
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_theta, rope_scaling = _rope_fields(hf)
        sliding = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
        moe = _moe_fields(arch, hf)
        if arch == "MixtralForCausalLM":
            sliding = hf.get("sliding_window")  # Mixtral applies its window whenever one is set
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(arch, hf),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            sliding_window=sliding,
            quantization=QuantizationConfig.from_hf(hf["quantization_config"]) if hf.get("quantization_config") else None,
            **moe,
        )

    @classmethod
    def from_dir(cls, path: str | Path, hf_overrides: dict[str, Any] | None = None) -> "ModelConfig":
        """config.json of the model directory ``path``, with ``hf_overrides`` merged into it (vLLM's
        ``hf_overrides``). A ``quantization_config`` that only the overrides give describes quantizing
        the checkpoint's high-precision weights at load (QuantizationConfig.for_unquantized_checkpoint)."""
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json; a model directory in Hugging Face layout is expected")
        hf = json.loads(cfg_path.read_text())
        cfg = cls.from_hf_dict(merge_hf_overrides(hf, hf_overrides or {}))
        if cfg.quantization is not None and "quantization_config" not in hf:
            cfg.quantization = cfg.quantization.for_unquantized_checkpoint()
        return cfg


def merge_hf_overrides(hf: dict[str, Any], overrides: dict[str, Any], where: str = "hf_overrides") -> dict[str, Any]:
    """``hf`` with ``overrides`` merged in: a key's value replaces the config's, except that a JSON
    object merges into an object key by key."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must be a dict (a JSON object) of config.json keys, got "
                         f"{type(overrides).__name__} {overrides!r}")
    merged = dict(hf)
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: key {key!r} is not a string; config.json keys are strings")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = merge_hf_overrides(merged[key], value, f"{where}.{key}")
        merged[key] = value
    return merged


def _rope_fields(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, rope scaling dict or None) from ``rope_scaling`` or transformers 5's
    ``rope_parameters``. The dict gets ``rope_type`` (older configs say ``type``) and, for llama3
    and yarn, ``original_max_position_embeddings`` (top level first, then the dict's, then
    ``max_position_embeddings``), as transformers fills them in."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta") or params.get("rope_theta") or scaling.get("rope_theta") or 10000.0
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config.json: unsupported rope_type {kind!r}; meshlm supports "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)} (and the default, none)")
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if kind in ("llama3", "yarn"):
        original = hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = original or hf.get("max_position_embeddings", 2048)
    if kind == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = hf.get("max_position_embeddings", 2048) / scaling["original_max_position_embeddings"]
    if not scaling.get("factor") or scaling["factor"] < 1:
        raise ValueError(f"config.json: rope_type {kind!r} needs a factor >= 1, got factor={scaling.get('factor')}")
    return float(theta), scaling


def _attention_bias(arch: str, hf: dict[str, Any]) -> bool:
    """Biases on the Q, K and V projections."""
    if arch == "Qwen2MoeForCausalLM":  # Qwen1.5-MoE configs predate the flag and have biases
        return bool(hf.get("qkv_bias", hf.get("attention_bias", True)))
    bias = bool(hf.get("attention_bias", arch == "Qwen2ForCausalLM"))
    if bias and arch == "Qwen3MoeForCausalLM":
        raise ValueError("config.json: attention_bias=true for Qwen3MoeForCausalLM (a bias on o_proj too) "
                         "is not supported")
    return bias


def _moe_fields(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig, from Mixtral's or Qwen-MoE's config.json."""
    if arch == "MixtralForCausalLM":
        # Mixtral's experts are its only MLPs: intermediate_size is the width of one expert.
        return dict(num_experts=hf["num_local_experts"], num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                    moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)
    if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return {}
    if arch == "Qwen2MoeForCausalLM" and hf.get("use_sliding_window"):
        # Its window applies to some layers only (layer_types); meshlm has one window per model.
        raise ValueError(f"config.json: use_sliding_window=true is not supported for {arch}")
    # Published configs say num_experts; transformers 5 writes its alias num_local_experts.
    num_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
    return dict(num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=(hf.get("shared_expert_intermediate_size") or 0
                                                 if arch == "Qwen2MoeForCausalLM" else 0),
                decoder_sparse_step=hf.get("decoder_sparse_step") or 1,
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()))
