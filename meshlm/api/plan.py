"""``meshlm plan``: every rank's memory for a layout, from config.json alone (no GPU, no weights).

The numbers come from executor/memory.py, the arithmetic the model runner sizes its KV pool with.
On a real card the runner measures what is in use after loading (weights, but also the CUDA context
and other processes), so its pool can come out a little smaller than planned here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshlm.config import EngineArgs, EngineConfig, auto_max_batch_size, auto_max_num_tokens
from meshlm.executor.memory import (GiB, RankPlan, check_pool_holds_a_request, check_weights_fit, plan_rank)
from meshlm.executor.model_runner import resolve_dtype
from meshlm.parallel.mapping import Mapping
from meshlm.weights.hub import hub_repo_id
from meshlm.weights.model_config import ModelConfig


@dataclass(slots=True)
class LayoutPlan:
    """Each rank's plan for one model, layout and card size."""

    model_name: str
    model_config: ModelConfig
    args: EngineArgs
    dtype: torch.dtype
    total_bytes: int
    max_model_len: int
    ranks: list[RankPlan]
    max_batch_size: int  # resolved, as the engine does for max_batch_size=None
    max_num_tokens: int  # resolved for the card, as the engine does for max_num_tokens=None

    @property
    def num_blocks(self) -> int:
        """The pool every rank allocates: num_kv_blocks when given, else the fewest that fit on any rank."""
        fit = min(rank.num_blocks for rank in self.ranks)
        return fit if self.args.num_kv_blocks is None else self.args.num_kv_blocks


def gpu_memory_bytes(gpu_memory_gb: float | None) -> int:
    """The memory of one GPU: ``gpu_memory_gb`` GiB, else the local GPU's."""
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise ValueError(f"--gpu-memory-gb={gpu_memory_gb} must be > 0")
        return int(gpu_memory_gb * GiB)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    raise ValueError("no GPU here to read the memory of; pass --gpu-memory-gb, the memory of one GPU "
                     "in GiB (e.g. --gpu-memory-gb 80)")


def plan_layout(args: EngineArgs, total_bytes: int) -> LayoutPlan:
    """Plan every rank of ``args``' layout on GPUs of ``total_bytes``; reads only config.json."""
    config = EngineConfig.from_args(args)  # resolves the model and checks the layout
    cfg = config.model
    dtype = resolve_dtype(args.dtype, cfg.torch_dtype, torch.device("cuda"))  # planned for a GPU
    parallel, scheduler = config.parallel, config.scheduler
    max_num_tokens = scheduler.max_num_tokens or auto_max_num_tokens(total_bytes)  # as the engine resolves it
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    mappings = [Mapping(parallel.world_size, rank, tp, pp, parallel.moe_expert_parallel_size or 1)
                for rank in range(parallel.world_size)]

    num_speculative_tokens = 0 if config.speculative is None else config.speculative.num_speculative_tokens

    def plan_ranks(max_batch_size: int, with_graphs: bool) -> list[RankPlan]:
        return [plan_rank(cfg, m, dtype.itemsize, total_bytes, config.cache, max_num_tokens,
                          max_batch_size, with_graphs, num_speculative_tokens) for m in mappings]

    max_batch_size = scheduler.max_batch_size
    if max_batch_size is None:  # as the engine resolves it: from the pool before the batch's reserve
        fit = min(rank.num_blocks for rank in plan_ranks(0, False))
        max_batch_size = auto_max_batch_size(max(0, fit) * config.cache.block_size, is_gpu=True)
    ranks = plan_ranks(max_batch_size, config.enable_cuda_graphs)
    name = hub_repo_id(args.model) or config.model_dir.name
    return LayoutPlan(name, cfg, args, dtype, total_bytes, config.max_model_len, ranks,
                      max_batch_size, max_num_tokens)


def check_plan(plan: LayoutPlan) -> None:
    """Raise what the engine would refuse: weights that leave no room, a pool below one request."""
    args, name = plan.args, str(plan.dtype).removeprefix("torch.")
    for rank in plan.ranks:
        check_weights_fit(rank, plan.total_bytes, args.gpu_memory_utilization, name)
    fit = min(rank.num_blocks for rank in plan.ranks)
    if plan.num_blocks > fit:
        per_block = max(rank.kv_bytes_per_token for rank in plan.ranks) * args.block_size
        raise ValueError(f"num_kv_blocks={plan.num_blocks} of {args.block_size} tokens take "
                         f"{plan.num_blocks * per_block / GiB:.2f} GiB on the busiest rank, but only {fit} "
                         f"blocks fit in gpu_memory_utilization={args.gpu_memory_utilization} x "
                         f"{plan.total_bytes / GiB:.1f} GiB; lower num_kv_blocks or raise tp or pp")
    check_pool_holds_a_request(plan.num_blocks, args.block_size, plan.max_model_len, args.cache_config(),
                               "cuda", args.tensor_parallel_size)


def format_plan(plan: LayoutPlan) -> str:
    """The plan as a table, one line per rank, and the pool every rank gets."""
    cfg, args = plan.model_config, plan.args
    share = plan.total_bytes * args.gpu_memory_utilization
    lines = [
        f"{plan.model_name}: {cfg.architecture}, {cfg.num_layers} layers, {cfg.num_heads} heads / "
        f"{cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}, dtype {str(plan.dtype).removeprefix('torch.')}, "
        f"KV cache dtype {args.kv_cache_dtype}",
        f"layout tp={args.tensor_parallel_size} pp={args.pipeline_parallel_size} "
        f"ep={args.moe_expert_parallel_size or 1}; one GPU {plan.total_bytes / GiB:.1f} GiB x "
        f"gpu_memory_utilization {args.gpu_memory_utilization} = {share / GiB:.2f} GiB per rank",
        f"reserve per rank for activations, logits and graphs: {_size(plan.ranks[0].reserve_bytes)} "
        f"(max_num_tokens={plan.max_num_tokens}, max_batch_size={plan.max_batch_size})",
        "",
        f"{'rank':>4}  {'tp':>5} {'pp':>5} {'ep':>5}  {'weights':>10}  {'KV/token':>10}  {'KV blocks':>9}  "
        f"{'KV tokens':>10}",
    ]
    for rank in plan.ranks:
        m = rank.mapping
        lines.append(f"{m.rank:>4}  {f'{m.tp_rank}/{m.tp}':>5} {f'{m.pp_rank}/{m.pp}':>5} "
                     f"{f'{m.moe_ep_rank}/{m.moe_ep}':>5}  {_size(rank.weight_bytes):>10}  "
                     f"{_size(rank.kv_bytes_per_token):>10}  {max(0, rank.num_blocks):>9}  {rank.num_tokens:>10}")
    blocks_per_seq = -(-plan.max_model_len // args.block_size)
    blocks = max(0, plan.num_blocks)
    source = "num_kv_blocks" if args.num_kv_blocks is not None else "the fewest of any rank"
    lines += ["", f"KV cache on every rank: {blocks} blocks of {args.block_size} tokens ({source}) = "
                  f"{blocks * args.block_size} tokens = {blocks // blocks_per_seq} sequences of "
                  f"max_model_len={plan.max_model_len}"]
    return "\n".join(lines)


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def run_plan(args: EngineArgs, gpu_memory_gb: float | None) -> str:
    """The printed plan; raises ValueError, after the table is printed, when the engine would refuse."""
    plan = plan_layout(args, gpu_memory_bytes(gpu_memory_gb))
    text = format_plan(plan)
    print(text, flush=True)
    check_plan(plan)
    return text
