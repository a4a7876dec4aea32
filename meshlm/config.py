"""The user's configuration: a few slotted dataclasses, validated on construction.

``None`` means "choose automatically". Values derived at run time (the number of KV blocks, the
eos ids) live in the objects that derive them, not here. The CLI and ``LLM(...)`` both read their
defaults from these classes, so a default is written once.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshlm.sampling_params import SamplingParams
from meshlm.step_limits import auto_max_batch_size, auto_max_num_tokens  # noqa: F401 (exported)
from meshlm.weights.resolve import resolve_model_on_ranks
from meshlm.weights.model_config import ModelConfig, merge_hf_overrides
from meshlm.weights.quantization import METHODS as QUANTIZATION_METHODS

__all__ = ["ModelConfig", "ParallelConfig", "CacheConfig", "SchedulerConfig", "SamplingParams",
           "SpeculativeConfig", "EngineArgs", "EngineConfig", "auto_max_batch_size",
           "auto_max_num_tokens"]

@dataclass(slots=True)
class ParallelConfig:
    """How many ranks split the model, and along which axes."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    moe_expert_parallel_size: int | None = None  # None: 1 (no expert parallelism)

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        ep = self.moe_expert_parallel_size
        if ep is not None and (ep < 1 or self.tensor_parallel_size % ep):
            raise ValueError(f"moe_expert_parallel_size={ep} must divide tensor_parallel_size="
                             f"{self.tensor_parallel_size}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


@dataclass(slots=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    num_blocks: int | None = None  # None: as many as fit in memory
    cpu_kv_cache_gb: float = 2.0  # KV pool size on the CPU backend when num_blocks is None
    enable_prefix_caching: bool = True
    # The pool's element type: "auto" the model's dtype, "fp8" (= "fp8_e4m3") float8 e4m3 with a
    # scale per layer (and KV head) for K and V, half the bytes of bf16 (vLLM's kv_cache_dtype).
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")


CAPACITY_SCHEDULER_POLICIES = ("max_utilization", "guaranteed_no_evict")


@dataclass(slots=True)
class SchedulerConfig:
    """In-flight batching limits.

    ``max_batch_size=None`` (auto) is resolved once the KV pool is known, by
    :func:`auto_max_batch_size`: on a GPU, as many sequences as the pool holds at
    ``AUTO_TOKENS_PER_SEQ`` (256) tokens each, rounded down to a multiple of 16 and kept within
    [16, 2048]; on the CPU, 256. The pool counted is the one before the batch's own reserve (its
    decode graphs and sampling rows), which it then gives up. An 8B bf16 model gets 2048 on a
    141 GB H200, about 1660 on an 80 GB H100 (vLLM's default there: 1024). Long sequences are
    bounded by the pool at admission whatever the cap; short ones by the cap: 2000 requests of
    128 + 128 tokens run as one batch on the H200 (at 512 tokens a sequence the cap was 1696, and
    the last 304 decoded alone). Decode graphs are captured for every batch size up to it.

    ``max_num_tokens=None`` (auto) is resolved when the runtime starts, by
    :func:`auto_max_num_tokens` from the card's memory (the smallest over ranks): 16384 on GPUs of
    70 GiB or more, else 8192; ``meshlm serve`` sets 8192.
    """

    max_num_tokens: int | None = None  # tokens in one step (prompt chunks + decodes); None: auto_max_num_tokens
    max_batch_size: int | None = None  # sequences in one step; None: auto_max_batch_size
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    capacity_scheduler_policy: str = "max_utilization"  # when to admit (TensorRT-LLM's; see Scheduler)

    def __post_init__(self) -> None:
        if self.capacity_scheduler_policy not in CAPACITY_SCHEDULER_POLICIES:
            raise ValueError(f"capacity_scheduler_policy={self.capacity_scheduler_policy!r}; choose one of "
                             f"{CAPACITY_SCHEDULER_POLICIES}")
        for name in ("max_num_tokens", "max_batch_size", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding, vLLM's ``speculative_config``: ``num_speculative_tokens`` drafts per verify
    step, from prompt lookup (``ngram``: the latest earlier occurrence of the last ``prompt_lookup_max``
    down to ``prompt_lookup_min`` tokens) or from a smaller ``model`` of the same vocabulary (``draft_model``)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # draft_model: the draft's directory in Hugging Face layout

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config method={self.method!r}; choose 'ngram' or 'draft_model'")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError(f"speculative_config method={self.method!r}, model={self.model!r}: "
                             "'draft_model' needs a model directory, 'ngram' takes none")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens={self.num_speculative_tokens} must be >= 1")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max="
                             f"{self.prompt_lookup_max} must satisfy 1 <= min <= max")

    @classmethod
    def from_dict(cls, spec: dict | None) -> "SpeculativeConfig | None":
        """None for None; else the config of vLLM's dict (unknown keys are an error)."""
        if spec is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"speculative_config keys {unknown} are unknown; known: {sorted(known)}")
        return cls(**spec)


def field_defaults(cls: type) -> dict[str, Any]:
    """Default values of a config dataclass, for the CLI (one source of defaults)."""
    return {f.name: f.default for f in fields(cls)}


_CACHE = field_defaults(CacheConfig)
_SCHED = field_defaults(SchedulerConfig)
_PAR = field_defaults(ParallelConfig)


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None  # None: the built-in default model; else a directory, a .gguf or ORG/NAME
    revision: str | None = None  # of a Hugging Face repo id: branch, tag or commit; None: main
    download_dir: str | None = None  # the hub cache for repo ids; None: HF_HUB_CACHE or $HF_HOME/hub
    tensor_parallel_size: int = _PAR["tensor_parallel_size"]
    pipeline_parallel_size: int = _PAR["pipeline_parallel_size"]
    moe_expert_parallel_size: int | None = _PAR["moe_expert_parallel_size"]
    dtype: str = "auto"
    device: str | None = None  # None: cuda when a GPU is present, else cpu
    seed: int = 0
    block_size: int = _CACHE["block_size"]
    num_kv_blocks: int | None = _CACHE["num_blocks"]
    gpu_memory_utilization: float = _CACHE["gpu_memory_utilization"]
    cpu_kv_cache_gb: float = _CACHE["cpu_kv_cache_gb"]
    enable_prefix_caching: bool = _CACHE["enable_prefix_caching"]
    kv_cache_dtype: str = _CACHE["cache_dtype"]  # "auto": the model's dtype; "fp8": float8 e4m3 (scaled)
    max_num_tokens: int = _SCHED["max_num_tokens"]
    max_batch_size: int | None = _SCHED["max_batch_size"]
    max_model_len: int | None = _SCHED["max_model_len"]
    capacity_scheduler_policy: str = _SCHED["capacity_scheduler_policy"]
    attention_backend: str | None = None  # None: triton on CUDA, reference on the CPU
    load_format: str = "auto"  # "auto": the checkpoint; "random": random weights of its shape
    skip_tokenizer_init: bool = False  # prompts are token ids and outputs carry no text
    enable_cuda_graphs: bool = True  # decode steps replay captured graphs (CUDA only)
    # Triton kernels for norms, rotary + KV-cache store, SiLU-and-mul; None: on with CUDA and Triton
    enable_fused_kernels: bool | None = None
    # Overlapped step loop: the host plans step n+1 while the device runs step n (see EngineConfig)
    async_scheduling: bool = True
    # Speculative decoding, as vLLM's dict: {"method": "ngram", "num_speculative_tokens": 4, ...}
    speculative_config: dict | None = None
    # "fp8": float8 weights of every linear layer (quantized at load unless the checkpoint is FP8);
    # None: as the checkpoint's quantization_config says
    quantization: str | None = None
    # Merged into the model's config.json, as vLLM's: {"quantization_config": {"quant_method": "fp8",
    # "ignored_layers": [...]}} keeps those layers unquantized when quantizing at load
    hf_overrides: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, str):  # the CLI's JSON
            self.speculative_config = _parse_json_dict("speculative_config", self.speculative_config)
        if isinstance(self.hf_overrides, str):
            self.hf_overrides = _parse_json_dict("hf_overrides", self.hf_overrides)
        merge_hf_overrides({}, self.hf_overrides or {})  # a dict of string keys, else a clear error
        SpeculativeConfig.from_dict(self.speculative_config)
        if self.load_format not in ("auto", "random"):
            raise ValueError(f"load_format={self.load_format!r}; choose auto or random")
        if self.quantization not in (None, *QUANTIZATION_METHODS):
            raise ValueError(f"quantization={self.quantization!r}; choose {' or '.join(QUANTIZATION_METHODS)} "
                             f"(or leave it unset)")
        self.parallel_config()
        self.cache_config()
        self.scheduler_config()

    @property
    def world_size(self) -> int:
        """Ranks the layout needs: tp x pp."""
        return self.parallel_config().world_size

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.moe_expert_parallel_size)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.gpu_memory_utilization, self.num_kv_blocks,
                           self.cpu_kv_cache_gb, self.enable_prefix_caching, self.kv_cache_dtype)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_tokens, self.max_batch_size, self.max_model_len,
                               self.capacity_scheduler_policy)

    # --- CLI -----------------------------------------------------------------------------------
    # Flags that differ from the field name ("--seed" is the per-request seed on the CLI).
    _FLAG = {"seed": "--engine-seed"}
    _SHORT = {"tensor_parallel_size": ["--tp"], "pipeline_parallel_size": ["--pp"],
              "moe_expert_parallel_size": ["--ep"]}

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        defaults = cls()
        for f in fields(cls):
            flag = cls._FLAG.get(f.name, "--" + f.name.replace("_", "-"))
            names = [flag] + cls._SHORT.get(f.name, [])
            default = getattr(defaults, f.name)
            if isinstance(default, bool) or str(f.type).startswith("bool"):
                parser.add_argument(*names, dest=f.name, default=default, action=argparse.BooleanOptionalAction)
                continue
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            parser.add_argument(*names, dest=f.name, type=kind, default=default,
                                help=f"(default: {default})")

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    def to_cli(self) -> list[str]:
        """The arguments that recreate these EngineArgs (used when relaunching under mpiexec)."""
        out = []
        defaults = EngineArgs()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name):
                continue
            flag = self._FLAG.get(f.name, "--" + f.name.replace("_", "-"))
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, dict):
                out += [flag, json.dumps(value)]
            else:
                out += [flag, str(value)]
        return out


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """The configuration every part of the engine reads, resolved once from EngineArgs and the
    model's config.json, after checking that the layout can split the model."""

    model_dir: Path | None  # None: random weights of ``model``'s shape, no tokenizer
    model: ModelConfig
    parallel: ParallelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    max_model_len: int
    dtype: str  # "auto" or a dtype name; the model runner resolves "auto" for its device
    device: str | None  # None: cuda when a GPU is present, else cpu
    seed: int
    load_format: str
    attention_backend: str | None
    skip_tokenizer_init: bool
    enable_cuda_graphs: bool
    enable_fused_kernels: bool
    # The overlapped step loop, as asked, except with pipeline stages: the tokens are sampled on
    # the last stage and the first one would need them for the next step, so pp > 1 runs the plain
    # loop. With tp > 1 the sampling rank broadcasts each step's tokens to its TP group on the device.
    async_scheduling: bool
    # Speculative decoding (None: off). Verify steps run the plain loop: async_scheduling is off.
    speculative: SpeculativeConfig | None = None
    draft_model: ModelConfig | None = None  # the draft's config, for method="draft_model"

    @classmethod
    def from_args(cls, args: EngineArgs) -> "EngineConfig":
        """Resolve the model (fetching the default one if needed) and check the layout against it."""
        model_dir = resolve_model_on_ranks(args.model, args.revision, args.download_dir)
        model = ModelConfig.from_dir(model_dir, args.hf_overrides).with_quantization(args.quantization,
                                                                                     args.load_format)
        parallel = args.parallel_config()
        check_layout(model, parallel)
        scheduler = args.scheduler_config()
        return cls(model_dir, model, parallel, args.cache_config(), scheduler,
                   _resolve_max_model_len(scheduler, model), args.dtype, args.device, args.seed, args.load_format,
                   args.attention_backend, args.skip_tokenizer_init, args.enable_cuda_graphs,
                   args.enable_fused_kernels, _resolve_async_scheduling(args, parallel), *_resolve_speculative(args, model))


    @classmethod
    def for_random_weights(cls, model: ModelConfig, **engine_args) -> "EngineConfig":
        """A configuration of random weights of ``model``'s shape, no checkpoint on disk (benchmarks,
        checks); ``engine_args`` are EngineArgs fields."""
        args = EngineArgs(load_format="random", skip_tokenizer_init=True, **engine_args)
        model = model.with_quantization(args.quantization, args.load_format)
        parallel = args.parallel_config()
        check_layout(model, parallel)
        scheduler = args.scheduler_config()
        return cls(None, model, parallel, args.cache_config(), scheduler,
                   _resolve_max_model_len(scheduler, model), args.dtype, args.device, args.seed,
                   args.load_format, args.attention_backend, args.skip_tokenizer_init, args.enable_cuda_graphs,
                   args.enable_fused_kernels, _resolve_async_scheduling(args, parallel), *_resolve_speculative(args, model))


def _resolve_speculative(args: EngineArgs, target: ModelConfig) -> tuple:
    """(SpeculativeConfig or None, the draft's config for draft_model: its vocabulary the target's)."""
    spec = SpeculativeConfig.from_dict(args.speculative_config)
    draft = None if spec is None or spec.model is None else ModelConfig.from_dir(spec.model)
    if draft is not None and draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft model {spec.model} has vocab_size={draft.vocab_size}, the target "
                         f"vocab_size={target.vocab_size}; a draft must share the target's vocabulary")
    return spec, draft


def _resolve_max_model_len(scheduler: SchedulerConfig, model: ModelConfig) -> int:
    """max_model_len as asked, else the model's longest context; never beyond that."""
    longest = model.derived_max_model_len
    if scheduler.max_model_len is None:
        return longest
    if scheduler.max_model_len > longest:
        scaling = model.rope_scaling
        rope = "no rope scaling" if scaling is None else f"rope_type {scaling['rope_type']} factor {scaling['factor']}"
        raise ValueError(f"max_model_len={scheduler.max_model_len} exceeds the model's context of {longest} "
                         f"tokens (max_position_embeddings={model.max_position_embeddings}, {rope}); "
                         f"lower max_model_len to at most {longest}")
    return scheduler.max_model_len


def _resolve_async_scheduling(args: EngineArgs, parallel: ParallelConfig) -> bool:
    """Off with pipeline stages, and with speculative decoding (a verify step's accepted tokens
    decide the next step's inputs and KV slots, so the next step waits for them)."""
    return (args.async_scheduling and parallel.pipeline_parallel_size == 1
            and args.speculative_config is None)


def _parse_json_dict(name: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {text!r}")
    return value


def check_layout(cfg: ModelConfig, parallel: ParallelConfig) -> None:
    """Fail before loading anything when the layout cannot split this model."""
    from meshlm.parallel.layers import check_tp_for_heads  # imports torch: only when checking
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    check_tp_for_heads(cfg.num_heads, cfg.num_kv_heads, tp)
    if not cfg.is_moe or cfg.has_dense_layers:
        if cfg.intermediate_size % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide intermediate_size={cfg.intermediate_size}")
    _check_moe_layout(cfg, tp, parallel.moe_expert_parallel_size)
    if pp > cfg.num_layers:
        raise ValueError(f"pipeline parallel size {pp} is larger than the model's {cfg.num_layers} layers")


def _check_moe_layout(cfg: ModelConfig, tp: int, moe_ep: int | None) -> None:
    """Experts split by moe_ep, each expert's width by moe_tp = tp / moe_ep, a shared expert by tp."""
    if not cfg.is_moe:
        if moe_ep not in (None, 1):
            raise ValueError(f"expert parallel size {moe_ep} was given but {cfg.architecture} has no experts")
        return
    from meshlm.parallel.experts import check_expert_layout
    check_expert_layout(cfg.num_experts, cfg.moe_intermediate_size, tp, moe_ep or 1)
    shared = cfg.shared_expert_intermediate_size
    if shared % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide shared_expert_intermediate_size={shared}")
