"""The per-rank engine: one model shard, its KV pool and its sampler; it executes step plans.

It knows nothing of requests beyond the arrays of a StepPlan. Every rank of the model runs
``execute`` on the same plan in the same order; only the sampling rank returns tokens, as an
AsyncStepResult whose copy to the host runs behind the step. With the overlapped loop each rank
of the (single) stage keeps the step's sampled tokens on the device, and the next plan's
``prev_token_rows`` take their input ids from them.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from meshlm.executor import memory
from meshlm.models import build_model
from meshlm.parallel.groups import ParallelGroups
from meshlm.kernels.attention import AttentionMetadata
from meshlm.weights.checkpoint import CheckpointReader
from meshlm.weights.progress import LoadProgress
from meshlm.config import CacheConfig, EngineConfig
from meshlm.kernels.fused_ops import select_ops
from meshlm.kernels.kv_quant import resolve_kv_cache_dtype
from meshlm.protocol import StepPlan, samples_every_row_once
from meshlm.executor.async_output import AsyncStepResult, SampledTokens
from meshlm.executor.prompt_logprobs import score_prompt_tokens
from meshlm.executor.grammar import GrammarCompiler
from meshlm.executor.sampler import Sampler
from meshlm.executor.warmup import warmup_plans
from meshlm.weights.random_weights import RandomCheckpoint

log = logging.getLogger("meshlm")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | None, model_dtype: str, device: torch.device) -> torch.dtype:
    """``None``/"auto": float32 on the CPU; on a GPU the checkpoint's 16-bit type, else bfloat16."""
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model_dtype == "float16" else torch.bfloat16


class ModelRunner:
    """One rank's model shard, KV pool, decode graphs and (on the sampling rank) sampler."""

    def __init__(self, config: EngineConfig, groups: ParallelGroups, device: torch.device,
                 eos_token_ids: Sequence[int] = ()):
        self.cfg = config.model
        self.groups = groups
        self.mapping = groups.mapping
        self.device = device
        self.dtype = resolve_dtype(config.dtype, self.cfg.torch_dtype, device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.cache.cache_dtype, self.dtype)
        self.max_model_len = config.max_model_len
        self.attention_fn = select_attention(config.attention_backend, device)
        self.model = build_model(self.cfg, groups, self.dtype, device, self.max_model_len, self.attention_fn)
        self.model.use_ops(select_ops(config.enable_fused_kernels, device))
        self.model.eval()
        self._load_weights(config)
        self.is_sampler = self.mapping.rank == self.mapping.sampler_rank
        self.sampler = Sampler(self.cfg.vocab_size, eos_token_ids, device, seed=config.seed,
                               grammars=_grammar_compiler(config, eos_token_ids)) if self.is_sampler else None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.graph_runner = None
        # Speculative decoding's verify steps replay graphs of 1 + num_speculative_tokens tokens a sequence
        self.num_speculative_tokens = 0 if config.speculative is None else config.speculative.num_speculative_tokens
        self.verify_graph_runner = None
        self.graph_memory_bytes = 0  # measured when the decode (and verify) graphs are captured
        self.async_scheduling = config.async_scheduling
        # The last step's sampled token ids [num_samples] on the device (the overlapped loop only);
        # None after a step that sampled nothing.
        self.prev_sampled_token_ids: torch.Tensor | None = None

    def _load_weights(self, config: EngineConfig) -> None:
        """Read this rank's shard (or random weights of its shape); a bar on rank 0 shows the bytes."""
        reader = (RandomCheckpoint(seed=config.seed) if config.load_format == "random"
                  else CheckpointReader(config.model_dir))
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        progress = LoadProgress(reader, total, self.dtype.itemsize, is_enabled=self.mapping.rank == 0)
        with torch.no_grad():
            self.model.load(progress)
        progress.close()
        log.info("loaded %.2f GiB of weights (this rank's shard) in %.1f s", total / 2**30, progress.elapsed_s)

    # --- KV pool -----------------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        return memory.kv_bytes_per_token(self.cfg, self.mapping, self.kv_cache_dtype.itemsize) * block_size

    def available_kv_blocks(self, cache: CacheConfig, max_num_tokens: int, max_batch_size: int,
                            graph_reserve_bytes: int = 0) -> int:
        """How many KV blocks fit on this rank (the coordinator takes the minimum over ranks).

        On a GPU: ``gpu_memory_utilization`` of the card, less what is in use now (weights, CUDA
        context, other processes), the activation reserve (executor/memory.py, as ``meshlm plan``)
        and the decode graphs' ``graph_reserve_bytes``.
        """
        if cache.num_blocks is not None:
            return cache.num_blocks
        per_block = max(1, self.kv_bytes_per_block(cache.block_size))
        if self.device.type == "cpu":
            return max(1, int(cache.cpu_kv_cache_gb * 2**30) // per_block)
        import gc
        gc.collect()  # tensors of an engine shut down earlier in this process, held only by cycles
        torch.cuda.empty_cache()  # memory this process freed but still caches is not in use
        free, total = torch.cuda.mem_get_info(self.device)
        used_elsewhere = total - free
        reserve = (memory.activation_reserve_bytes(self.cfg, self.groups.tp.size, max_num_tokens, max_batch_size,
                                                  self.dtype.itemsize)
                   + graph_reserve_bytes)
        blocks = memory.kv_blocks_that_fit(total, cache.gpu_memory_utilization, used_elsewhere, reserve, per_block)
        if blocks < 1:
            raise RuntimeError(f"{self.mapping.describe()}: no GPU memory left for the KV cache "
                               f"(total {total / 2**30:.1f} GiB, in use {used_elsewhere / 2**30:.1f} GiB, "
                               f"reserve for steps and graphs {reserve / 2**30:.2f} GiB, "
                               f"gpu_memory_utilization={cache.gpu_memory_utilization}); raise "
                               f"gpu_memory_utilization or tp (now {self.mapping.tp}) or pp "
                               f"(now {self.mapping.pp}), or lower max_num_tokens (now {max_num_tokens}) "
                               f"or max_batch_size (now {max_batch_size})")
        return blocks

    # --- memory that grows with max_batch_size, set aside before the KV pool is sized -----------
    def uses_triton_attention(self) -> bool:
        """CUDA, the Triton attention kernels (compiled on first use) and a model with attention layers."""
        return (self.device.type == "cuda" and bool(self.model.attention_layers)
                and getattr(self.attention_fn, "__name__", "") == "paged_attention_triton")

    def compiles_kernels_on_first_use(self) -> bool:
        """Whether a step kind's first run compiles kernels (Triton's): start-up then warms them up."""
        return self.uses_triton_attention()

    def can_capture_cuda_graphs(self) -> bool:
        """Decode graphs need the Triton attention path (uses_triton_attention)."""
        return self.uses_triton_attention()

    def graph_memory_reserve_bytes(self, max_batch_size: int) -> int:
        """The decode (and verify) graphs' memory for batches up to ``max_batch_size`` (executor/memory.py)."""
        return memory.graph_reserve_bytes(self.cfg, self.mapping, self.dtype.itemsize, max_batch_size,
                                          self.num_speculative_tokens)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Blocks 0..num_blocks-1 belong to the scheduler; one more is scratch for padding rows."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = []
        for attn in self.model.attention_layers:
            shape = (num_blocks + 1, block_size, attn.num_kv_heads_per_rank, attn.head_dim)
            self.kv_caches.append((torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                                   torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)))

    def capture_cuda_graphs(self, max_batch_size: int) -> None:
        """Capture decode graphs for every bucket up to ``max_batch_size`` when the path allows it
        (can_capture_cuda_graphs), then with speculative decoding the verify graphs in the same
        pool; logs the device memory they took against the reserved estimate."""
        from meshlm.executor.cuda_graphs import DecodeGraphRunner, default_buckets
        from meshlm.executor.verify_graphs import VerifyGraphRunner, verify_buckets
        if not self.can_capture_cuda_graphs():
            return
        max_blocks = -(-self.max_model_len // self.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        runner = DecodeGraphRunner(self.model, self.groups, self.kv_caches, self.device,
                                   default_buckets(max_batch_size),
                                   max_blocks, self.num_blocks, self.block_size, self.max_model_len)
        runner.capture()
        if self.num_speculative_tokens:
            self.verify_graph_runner = VerifyGraphRunner(
                self.model, self.groups, self.kv_caches, self.device,
                verify_buckets(max_batch_size, self.num_speculative_tokens), self.num_speculative_tokens,
                self.num_blocks, self.block_size, self.max_model_len)
            self.verify_graph_runner.capture(runner.pool)
        torch.cuda.empty_cache()  # the warm-up steps' cached blocks are the activations' share
        self.graph_memory_bytes = free_before - torch.cuda.mem_get_info(self.device)[0]
        estimate = self.graph_memory_reserve_bytes(max_batch_size)
        log.info("CUDA graphs up to batch %d take %.2f GiB (%.2f GiB reserved)", max_batch_size,
                 self.graph_memory_bytes / 2**30, estimate / 2**30)
        if self.graph_memory_bytes > estimate:
            log.warning("CUDA graphs take %.2f GiB, more than the %.2f GiB reserved for them",
                        self.graph_memory_bytes / 2**30, estimate / 2**30)
        self.graph_runner = runner

    @torch.inference_mode()
    def warm_up_mixed_steps(self, max_batch_size: int, max_num_tokens: int) -> int:
        """The eager forward of each synthetic mixed step of :func:`warmup_plans` (the KV pool
        allocated), so that their kernels compile now; returns how many ran."""
        plans = warmup_plans(max_batch_size, max_num_tokens, self.max_model_len, self.block_size, self.num_blocks)
        for plan in plans:
            self._forward_eager(plan)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(plans)

    # --- one step ----------------------------------------------------------------------------
    def update_requests(self, plan: StepPlan) -> None:
        if self.sampler is None:
            return
        for new in plan.new_requests:
            self.sampler.add_request(new.request_id, new.params, new.prompt_token_ids)
        for request_id in plan.finished_request_ids:
            self.sampler.remove_request(request_id)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> AsyncStepResult | None:
        """Launch one step. The sampling rank returns its tokens (and prompt logprobs) on their way
        to the host; other ranks return None. Nothing here waits for the device (on the GPU)."""
        self.update_requests(plan)
        self.copy_blocks(plan.block_copies)
        logits, prompt_scores = self._forward(plan)
        sampled = None
        if logits is not None:
            sampled = self._sample(plan, logits)
        elif prompt_scores is not None:  # a prompt chunk that samples nothing
            sampled = SampledTokens(torch.zeros(0, dtype=torch.int64, device=self.device), None, None, None)
        if prompt_scores is not None:
            sampled.prompt_logprobs, sampled.prompt_top_token_ids, sampled.prompt_top_logprobs = prompt_scores
        self.prev_sampled_token_ids = self._share_sampled_tokens(plan, None if sampled is None else sampled.token_ids)
        return None if sampled is None else AsyncStepResult(sampled)

    def copy_blocks(self, block_copies: np.ndarray) -> None:
        """Copy-on-write: block ``src`` to block ``dst`` in every layer's K and V pool, for each
        (src, dst) row of ``block_copies`` [num_copies, 2]; one batched index copy per pool."""
        if len(block_copies) == 0 or not self.kv_caches:
            return
        copies = self._to_device(np.ascontiguousarray(block_copies.T))  # [2, num_copies]
        src, dst = copies[0], copies[1]
        for pool in (p for kv in self.kv_caches for p in kv):
            if pool.element_size() == 1:  # a float8 pool: the CPU has no float8 index_copy, bytes copy alike
                pool = pool.view(torch.uint8)
            pool.index_copy_(0, dst, pool.index_select(0, src))  # [num_copies, block_size, heads, head_dim]

    def _sample(self, plan: StepPlan, logits: torch.Tensor):
        if not plan.has_drafts:
            return self.sampler.sample_on_device(logits, plan.sample_request_ids)
        # Each logits row scores the token after it: the next draft (the sample row's last is unused).
        draft_ids = plan.input_ids[np.minimum(plan.logits_token_index() + 1, plan.num_tokens - 1)]
        return self.sampler.sample_on_device(logits, plan.sample_request_ids, plan.num_draft_tokens,
                                             self._to_device(draft_ids))

    def _share_sampled_tokens(self, plan: StepPlan, token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The step's sampled tokens on every TP rank (the overlapped loop needs them on each rank
        that embeds the next step's input ids; pipeline stages run the plain loop)."""
        if not self.async_scheduling or plan.num_tokens == 0 or len(plan.sample_rows) == 0:
            return None
        if self.groups.tp.size == 1:
            return token_ids
        if token_ids is None:  # a TP rank other than the sampler: receive them
            token_ids = torch.empty(len(plan.sample_rows), dtype=torch.int64, device=self.device)
        return self.groups.broadcast_sampled_tokens(token_ids)

    def _input_ids(self, plan: StepPlan) -> torch.Tensor:
        """The step's input ids on the device, the placeholders filled from the last step's tokens."""
        input_ids = self._to_device(plan.input_ids)  # [num_tokens]
        prev_tokens = self.previous_tokens(plan)
        if prev_tokens is None:
            return input_ids
        return input_ids.index_put((self._to_device(plan.prev_token_index),), prev_tokens)  # a copy

    def previous_tokens(self, plan: StepPlan) -> torch.Tensor | None:
        """The last step's sampled tokens that the plan's placeholders take ([num_prev] on the
        device); None when the plan has no placeholders."""
        if len(plan.prev_token_rows) == 0:
            return None
        if self.prev_sampled_token_ids is None:
            raise RuntimeError(f"{self.mapping.describe()}: the plan takes {len(plan.prev_token_rows)} input "
                               f"ids from the previous step's sampled tokens, but that step sampled none here")
        return self.prev_sampled_token_ids[self._to_device(plan.prev_token_rows)]

    @torch.inference_mode()
    def forward_logits(self, plan: StepPlan) -> torch.Tensor | None:
        """float32 logits [num_logits, vocab] of the plan's sample rows on the sampling rank, without
        sampling (tests and checks); None on the other ranks."""
        logits = self._forward(plan)[0]
        return None if logits is None else logits.float()

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor | None, tuple | None]:
        """The step's forward on this rank. The sampling rank gets the logits (in the model's dtype) of
        the sample rows over the whole vocabulary and the plan's prompt-token scores
        (``score_prompt_tokens``); every other rank ``(None, None)``."""
        if plan.num_tokens == 0:
            return None, None
        wants_prompt_logprobs = len(plan.prompt_logprob_index) > 0
        if self.graph_runner is not None and not wants_prompt_logprobs and self.graph_runner.can_run(plan):
            shard = self.graph_runner.run(plan, self.previous_tokens(plan))  # every row's; None before the last stage
            if shard is None or len(plan.sample_rows) == 0:
                return None, None
            if not samples_every_row_once(plan):
                shard = shard[self._to_device(plan.sample_rows)]
            return self._sampler_logits(shard), None
        verify_graphs = self.verify_graph_runner
        if verify_graphs is not None and not wants_prompt_logprobs and verify_graphs.can_run(plan):
            shard = verify_graphs.run(plan, self.previous_tokens(plan))  # the rows of logits_token_index()
            return (None if shard is None else self._sampler_logits(shard)), None
        hidden = self._forward_eager(plan)  # [num_tokens, hidden_size] on the last stage, else None
        if hidden is None:
            return None, None
        logits = None
        if len(plan.sample_rows) > 0:
            # Each sample row's last token, and the tokens its drafts follow (speculative decoding)
            logits_index = self._to_device(plan.logits_token_index())  # [num_logits]
            logits = self._sampler_logits(self.model.compute_logits(hidden[logits_index]))
        if not wants_prompt_logprobs:
            return logits, None
        scores = score_prompt_tokens(
            hidden, self._to_device(plan.prompt_logprob_index), self._to_device(plan.prompt_logprob_target_ids),
            int(plan.prompt_logprob_num_top.max()),
            lambda rows: self._sampler_logits(self.model.compute_logits(rows), as_float=True))
        return logits, scores

    def _sampler_logits(self, logits_shard: torch.Tensor, as_float: bool = False) -> torch.Tensor | None:
        """This rank's vocab shard [num_rows, vocab_per_rank] gathered into the sampler's logits
        [num_rows, vocab_size] (a TP collective), in the model's dtype (the sampler widens them
        where it needs to) or, ``as_float``, in float32; None on the other TP ranks."""
        logits = self.groups.gather_logits_to_sampler(logits_shard)
        if logits is None:
            return None
        logits = logits[:, :self.cfg.vocab_size]
        return logits.float() if as_float else logits

    def _forward_eager(self, plan: StepPlan) -> torch.Tensor | None:
        """The hidden states [num_tokens, hidden_size] of the last stage, else None."""
        meta = self._metadata(plan)
        if self.mapping.is_first_pp_rank:
            hidden = self.model.embed(self._input_ids(plan))
        else:
            hidden = self.groups.recv_from_prev_stage((plan.num_tokens, self.cfg.hidden_size), self.dtype,
                                                      self.device)
        hidden = self.model(hidden, meta, self.kv_caches)
        if not self.mapping.is_last_pp_rank:
            self.groups.send_to_next_stage(hidden)
            return None
        return hidden

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _metadata(self, plan: StepPlan) -> AttentionMetadata:
        query_lens = plan.query_lens
        return AttentionMetadata(
            positions=self._to_device(plan.positions),
            slot_mapping=self._to_device(plan.slot_mapping),
            query_start_loc=self._to_device(plan.query_start_loc),
            seq_lens=self._to_device(plan.seq_lens),
            block_tables=self._to_device(plan.block_tables),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(plan.seq_lens.max()),
            query_lens_host=query_lens,
        )

    def shutdown(self) -> None:
        # Graphs that captured NCCL calls go before the communicators
        self.graph_runner = self.verify_graph_runner = None
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.groups.destroy()
        import gc
        gc.unfreeze()  # start-up froze this engine's objects (api/build.py): let cycles among them go
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def _grammar_compiler(config: EngineConfig, eos_token_ids: Sequence[int]) -> GrammarCompiler | None:
    """Structured outputs compile against the model's tokenizer; None without one."""
    if config.model_dir is None or config.skip_tokenizer_init:
        return None
    return GrammarCompiler(config.model_dir / "tokenizer.json", config.model.vocab_size, eos_token_ids)


def select_attention(backend: str | None, device: torch.device):
    """``None``: the Triton kernel on CUDA when available, else the reference path."""
    from meshlm.kernels.attention import paged_attention_reference
    if backend in (None, "auto") and device.type == "cuda":
        try:
            from meshlm.kernels.triton_attention import paged_attention_triton
            return paged_attention_triton
        except ImportError:
            return paged_attention_reference
    if backend in (None, "auto", "reference"):
        return paged_attention_reference
    if backend == "triton":
        from meshlm.kernels.triton_attention import paged_attention_triton
        return paged_attention_triton
    raise ValueError(f"attention_backend={backend!r}; choose auto, reference or triton")
