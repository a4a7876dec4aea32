"""Engine arguments: the one list of knobs that ``LLM(...)`` and the CLI share.

Defaults come from the config dataclasses, so each is written once.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from meshlm.runtime.config import CacheConfig, ParallelConfig, SchedulerConfig, field_defaults

_CACHE = field_defaults(CacheConfig)
_SCHED = field_defaults(SchedulerConfig)
_PAR = field_defaults(ParallelConfig)


@dataclass(slots=True)
class EngineArgs:
    model: str | None = None  # None: the built-in default model
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
    max_num_tokens: int = _SCHED["max_num_tokens"]
    max_batch_size: int = _SCHED["max_batch_size"]
    max_model_len: int | None = _SCHED["max_model_len"]
    attention_backend: str | None = None  # None: triton on CUDA, reference on the CPU
    load_format: str = "auto"  # "auto": the checkpoint; "random": random weights of its shape
    skip_tokenizer_init: bool = False  # prompts are token ids and outputs carry no text
    enable_cuda_graphs: bool = True  # decode steps replay captured graphs (CUDA only)
    enable_fused_kernels: bool = False  # Triton kernels for norms, rotary, SiLU-and-mul (CUDA only)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "random"):
            raise ValueError(f"load_format={self.load_format!r}; choose auto or random")
        self.parallel_config()
        self.cache_config()
        self.scheduler_config()

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.moe_expert_parallel_size)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.gpu_memory_utilization, self.num_kv_blocks,
                           self.cpu_kv_cache_gb, self.enable_prefix_caching)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_tokens, self.max_batch_size, self.max_model_len)

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
            if isinstance(default, bool):
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
            else:
                out += [flag, str(value)]
        return out
