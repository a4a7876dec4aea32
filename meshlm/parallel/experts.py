"""Expert parallelism: the router and a FusedMoE-like layer that holds this rank's experts.

Inside a TP group of ``tp = moe_tp x moe_ep`` ranks, expert-parallel rank ``r`` of ``moe_ep`` holds
the contiguous block of experts ``[r * E / moe_ep, (r + 1) * E / moe_ep)`` and, of each, the slice
``moe_tp_rank`` of its intermediate dimension (gate/up rows, down columns), read from disk alone.

Dispatch and combine. After the attention all-reduce every TP rank holds every token, so the
tokens already sit on the ranks that own their experts: each rank routes all tokens (the router
is replicated, so every rank picks the same experts), runs the tokens routed to its own experts
through its slices, and returns a partial sum. One all-reduce over the TP group
(``ParallelGroups.combine_from_experts``) then adds the expert-parallel and the moe-tp partial
sums together. That costs what a dense MLP's all-reduce costs; an all-to-all dispatch pays only
where tokens are sharded across ranks (data-parallel attention), which meshlm does not do.

Expert compute never loops over tokens. The (token, slot) pairs are sorted by expert, so each
local expert owns a contiguous run of rows, then:

- ``grouped``: one grouped GEMM per projection over all runs (``torch.nn.functional.grouped_mm``
  with device-side offsets): no host synchronisation, so it can be captured in CUDA graphs. The
  default on CUDA where the kernel takes the dtype (bf16 on sm80+).
- ``loop``: a loop over the local experts, one GEMM per contiguous run; the run lengths come to
  the host once per call. The CPU reference path, and the eager path on CUDA for other dtypes.
- ``padded``: each local expert gets ``num_tokens`` rows (a token picks an expert at most once),
  filled with its pairs and zeros, and one batched GEMM per projection runs them all: no host
  synchronisation, any dtype, but work for ``num_local_experts x num_tokens`` rows. Used while a
  CUDA graph of a decode step is captured and ``grouped`` is unavailable (fp16, fp32).

FP8 experts (a QuantizationConfig): ``w13``/``w2`` float8 with one scale per output row of each
expert (``w13_scale`` [E_local, 2 * inter_per_rank], ``w2_scale`` [E_local, hidden]); ``loop`` runs
each expert's scaled product, ``padded`` a batched one; ``grouped`` is not used for them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.kernels.fp8 import FP8_DTYPE, bmm, per_token_linear
from meshlm.parallel.fp8_weights import check_fp8_support, quantize_weight_rows, read_fp8, read_unquantized
from meshlm.parallel.mapping import Mapping
from meshlm.weights.quantization import QuantizationConfig

# Token-expert pairs per chunk of the expert compute: bounds the [pairs, hidden] temporaries of a
# long prefill (decode batches fit in one chunk).
MAX_PAIRS_PER_CHUNK = 16384

BACKENDS = ("grouped", "loop", "padded")


def check_expert_layout(num_experts: int, moe_intermediate_size: int, tp: int, moe_ep: int) -> None:
    """Fail when ``moe_ep`` does not split the experts or ``moe_tp = tp / moe_ep`` their width."""
    if moe_ep < 1 or tp % moe_ep:
        raise ValueError(f"expert parallel size moe_ep={moe_ep} must divide tensor parallel size tp={tp}")
    moe_tp = tp // moe_ep
    if num_experts % moe_ep:
        raise ValueError(f"expert parallel size moe_ep={moe_ep} does not divide num_experts={num_experts} "
                         f"(tp={tp} = moe_tp={moe_tp} x moe_ep={moe_ep}); moe_ep values that work: "
                         f"{[d for d in range(1, tp + 1) if tp % d == 0 and num_experts % d == 0]}")
    if moe_intermediate_size % moe_tp:
        raise ValueError(f"expert tensor parallel size moe_tp={moe_tp} (tp={tp} / moe_ep={moe_ep}) does not "
                         f"divide the expert width moe_intermediate_size={moe_intermediate_size}")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts, keep the top k, optionally rescale them to sum to 1.

    ``router_logits``: [num_tokens, num_experts]. Returns (weights float32 [num_tokens, top_k],
    expert ids int64 [num_tokens, top_k]), as Mixtral and Qwen-MoE route.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class Router(nn.Module):
    """The gate: ``[num_experts, hidden]``, replicated on every rank so all ranks route alike."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty((num_experts, hidden_size), dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return route(F.linear(hidden, self.weight), self.top_k, self.renormalize)

    def expected_shapes(self, name: str) -> dict:
        return {name: tuple(self.weight.shape)}

    @torch.no_grad()
    def load(self, reader, name: str) -> None:
        self.weight.copy_(reader.read(name))


@dataclass(frozen=True, slots=True)
class ExpertNames:
    """Checkpoint names of one layer's experts, in either layout.

    Per expert (published checkpoints, and what transformers' ``save_pretrained`` writes):
    ``gate``/``up``/``down`` hold ``{e}`` for the expert id; gate and up are [moe_inter, hidden],
    down is [hidden, moe_inter]. Fused (transformers' in-memory form): ``fused_gate_up``
    [E, 2 * moe_inter, hidden] (gate rows first, then up) and ``fused_down`` [E, hidden, moe_inter].
    """

    gate: str
    up: str
    down: str
    fused_gate_up: str
    fused_down: str


def has_tensor(reader, name: str) -> bool:
    """Whether a checkpoint reader holds ``name`` (readers without a listing, e.g. random ones, do not)."""
    try:
        return name in reader
    except TypeError:
        return False


class FusedMoE(nn.Module):
    """This rank's experts: ``w13`` [E_local, 2 * inter_per_rank, hidden] (gate rows, then up rows)
    and ``w2`` [E_local, hidden, inter_per_rank].

    ``forward`` returns this rank's partial sum; combine it across the TP group
    (``ParallelGroups.combine_from_experts``). The rank's place in the expert-parallel and
    expert-tensor-parallel split comes from its Mapping (no collective runs here).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 mapping: Mapping, dtype: torch.dtype, device=None, quant: QuantizationConfig | None = None):
        super().__init__()
        check_expert_layout(num_experts, intermediate_size, mapping.tp, mapping.moe_ep)
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_local_experts = num_experts // mapping.moe_ep
        self.expert_start = mapping.moe_ep_rank * self.num_local_experts
        self.inter_per_rank = intermediate_size // mapping.moe_tp
        self.inter_start = mapping.moe_tp_rank * self.inter_per_rank
        self.quant = quant
        w13_shape = (self.num_local_experts, 2 * self.inter_per_rank, hidden_size)
        w2_shape = (self.num_local_experts, hidden_size, self.inter_per_rank)
        weight_dtype = dtype if quant is None else FP8_DTYPE
        self.w13 = nn.Parameter(torch.empty(w13_shape, dtype=weight_dtype, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(w2_shape, dtype=weight_dtype, device=device), requires_grad=False)
        self.w13_scale = self.w2_scale = None
        if quant is not None:
            self.w13_scale = nn.Parameter(torch.empty(w13_shape[:2], dtype=torch.float32, device=device),
                                          requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(w2_shape[:2], dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.backend: str | None = None  # None: auto (see backend_for)
        self.is_fused_checkpoint = False

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        return range(self.expert_start, self.expert_start + self.num_local_experts)

    # --- forward -----------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """``hidden`` [num_tokens, hidden], ``topk_*`` [num_tokens, top_k] -> partial sum [num_tokens, hidden].

        Pairs routed to other ranks' experts contribute zero here.
        """
        backend = self.backend_for(hidden)
        step = max(1, MAX_PAIRS_PER_CHUNK // self.top_k)
        if hidden.shape[0] <= step:
            return self._run(backend, hidden, topk_weights, topk_ids)
        return torch.cat([self._run(backend, hidden[i:i + step], topk_weights[i:i + step], topk_ids[i:i + step])
                          for i in range(0, hidden.shape[0], step)])

    def backend_for(self, hidden: torch.Tensor) -> str:
        if self.backend is not None:
            return self.backend
        if hidden.device.type != "cuda":
            return "loop"
        if self.quant is not None:
            return "padded" if torch.cuda.is_current_stream_capturing() else "loop"
        if grouped_mm_supported(hidden.dtype, self.hidden_size, self.inter_per_rank):
            return "grouped"
        return "padded" if torch.cuda.is_current_stream_capturing() else "loop"

    def _run(self, backend: str, hidden, topk_weights, topk_ids) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        local_ids = topk_ids - self.expert_start  # [num_tokens, top_k]
        is_local = (local_ids >= 0) & (local_ids < self.num_local_experts)
        order, ends = sort_by_expert(local_ids, is_local, self.num_local_experts)
        token = order // self.top_k  # [num_pairs] token of each sorted pair
        weight = topk_weights.flatten()[order]  # [num_pairs]
        if backend in ("grouped", "padded"):
            pair_is_local = is_local.flatten()[order]  # [num_pairs]
            if backend == "grouped":
                y = self._grouped(hidden[token], ends)  # [num_pairs, hidden]; rows past ends[-1] undefined
            else:
                y = self._padded(hidden[token], local_ids.flatten()[order], pair_is_local, ends)
            y = torch.where(pair_is_local[:, None], y.float() * weight[:, None], 0.0)
            pairs = torch.empty_like(y)
        elif backend == "loop":
            ends_host = ends.tolist()  # the one host sync of this path
            num_local_pairs = ends_host[-1] if ends_host else 0
            order, token, weight = order[:num_local_pairs], token[:num_local_pairs], weight[:num_local_pairs]
            y = self._loop(hidden[token], ends_host).float() * weight[:, None]  # [num_local_pairs, hidden]
            pairs = torch.zeros((num_tokens * self.top_k, self.hidden_size), dtype=torch.float32,
                                device=hidden.device)
        else:
            raise ValueError(f"MoE backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        # Back to (token, slot) order and a sum over the slots: deterministic, unlike an index_add.
        pairs[order] = y  # [num_tokens * top_k, hidden]
        return pairs.view(num_tokens, self.top_k, self.hidden_size).sum(dim=1).to(hidden.dtype)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Local expert ``e`` on rows ``x`` [n, hidden] -> [n, hidden]."""
        gate_up = per_token_linear(x, self.w13[e], self._scale(self.w13_scale, e))  # [n, 2 * inter_per_rank]
        gate, up = gate_up.chunk(2, dim=-1)  # [n, inter_per_rank] each
        return per_token_linear(F.silu(gate) * up, self.w2[e], self._scale(self.w2_scale, e))

    @staticmethod
    def _scale(scales: torch.Tensor | None, e: int) -> torch.Tensor | None:
        return None if scales is None else scales[e]

    def _loop(self, x: torch.Tensor, ends: list[int]) -> torch.Tensor:
        y = torch.empty_like(x)  # [num_local_pairs, hidden]
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                y[start:end] = self._expert(x[start:end], e)
            start = end
        return y

    def _grouped(self, x: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        gate_up = grouped_mm(x, self.w13.transpose(1, 2), ends)  # [num_pairs, 2 * inter_per_rank]
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), ends)  # [num_pairs, hidden]

    def _padded(self, x: torch.Tensor, expert: torch.Tensor, is_local: torch.Tensor,
                ends: torch.Tensor) -> torch.Tensor:
        """``x`` [num_pairs, hidden] sorted by local ``expert`` [num_pairs] -> [num_pairs, hidden]
        (rows of other ranks' pairs are meaningless: the caller masks them)."""
        num_experts, capacity = self.num_local_experts, x.shape[0] // self.top_k  # capacity: num_tokens
        starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()  # [num_local_experts]
        # Other ranks' pairs all land in row 0 of a scratch expert past the real ones.
        rank_in_run = torch.arange(x.shape[0], device=x.device) - starts[expert.clamp(0, num_experts - 1)]
        row = torch.where(is_local, rank_in_run, 0)
        expert = torch.where(is_local, expert, num_experts)
        padded = x.new_zeros((num_experts + 1, capacity, self.hidden_size))
        padded[expert, row] = x
        padded = padded[:num_experts]  # [num_local_experts, capacity, hidden]
        gate_up = bmm(padded, self.w13, self.w13_scale)  # [num_local_experts, capacity, 2 * inter_per_rank]
        gate, up = gate_up.chunk(2, dim=-1)
        y = bmm(F.silu(gate) * up, self.w2, self.w2_scale)  # [num_local_experts, capacity, hidden]
        return y[expert.clamp(max=num_experts - 1), row]

    # --- weights -----------------------------------------------------------------------------
    def expected_shapes(self, names: ExpertNames) -> dict:
        """Full checkpoint shapes of the tensors this rank reads (its own experts only)."""
        inter, hidden, num = self.intermediate_size, self.hidden_size, self.num_experts
        if self.is_fused_checkpoint:
            return {names.fused_gate_up: (num, 2 * inter, hidden), names.fused_down: (num, hidden, inter)}
        shapes = {}
        for e in self.local_experts:
            shapes[names.gate.format(e=e)] = (inter, hidden)
            shapes[names.up.format(e=e)] = (inter, hidden)
            shapes[names.down.format(e=e)] = (hidden, inter)
        if self.quant is not None:
            for name, shape in list(shapes.items()):
                shapes.update(self.quant.scale_shapes(name, shape))
        return shapes

    def detect_layout(self, reader, names: ExpertNames) -> None:
        """Per-expert or fused tensors: whichever the checkpoint holds (call before expected_shapes)."""
        self.is_fused_checkpoint = has_tensor(reader, names.fused_gate_up)

    @torch.no_grad()
    def load(self, reader, names: ExpertNames) -> None:
        """Read this rank's experts, and of each only its slice of the intermediate dimension."""
        n, lo = self.inter_per_rank, self.inter_start
        if self.is_fused_checkpoint:
            self._load_fused(reader, names)
            return
        if self.quant is not None:
            self._load_fp8(reader, names)
            return
        for i, e in enumerate(self.local_experts):
            self.w13[i, :n].copy_(read_unquantized(reader, names.gate.format(e=e), 0, lo, lo + n))
            self.w13[i, n:].copy_(read_unquantized(reader, names.up.format(e=e), 0, lo, lo + n))
            self.w2[i].copy_(read_unquantized(reader, names.down.format(e=e), 1, lo, lo + n))

    def _load_fp8(self, reader, names: ExpertNames) -> None:
        """Float8 rows and their scales; down's rows are scaled over the full expert width."""
        n, lo = self.inter_per_rank, self.inter_start
        for i, e in enumerate(self.local_experts):
            for part, name in enumerate((names.gate.format(e=e), names.up.format(e=e))):
                weight, scale = read_fp8(reader, self.quant, name, 0, lo, lo + n, self.w13.device)
                self.w13[i, part * n:(part + 1) * n].copy_(weight)
                self.w13_scale[i, part * n:(part + 1) * n].copy_(scale)
            weight, scale = read_fp8(reader, self.quant, names.down.format(e=e), 1, lo, lo + n, self.w2.device)
            self.w2[i].copy_(weight)
            self.w2_scale[i].copy_(scale)

    def _load_fused(self, reader, names: ExpertNames) -> None:
        # A read slices one dim: this rank's experts. Their full width comes off the disk and the
        # moe_tp slice is cut here, so with moe_tp > 1 a rank reads moe_tp times its share.
        n, lo, inter = self.inter_per_rank, self.inter_start, self.intermediate_size
        first, stop = self.expert_start, self.expert_start + self.num_local_experts
        gate_up = reader.read(names.fused_gate_up, 0, first, stop)  # [E_local, 2 * inter, hidden]
        rows13 = torch.cat([gate_up[:, lo:lo + n], gate_up[:, inter + lo:inter + lo + n]], dim=1)  # [E_local, 2n, hidden]
        down = reader.read(names.fused_down, 0, first, stop)  # [E_local, hidden, inter]
        if self.quant is None:
            self.w13.copy_(rows13)
            self.w2.copy_(down[:, :, lo:lo + n])
            return
        check_fp8_support(self.quant, names.fused_gate_up)
        q13, s13 = quantize_weight_rows(rows13, self.w13.device)  # scales [E_local, 2n, 1]
        q2, s2 = quantize_weight_rows(down, self.w2.device)  # down's whole rows: scales over the full expert width
        self.w13.copy_(q13)
        self.w13_scale.copy_(s13[..., 0])
        self.w2.copy_(q2[:, :, lo:lo + n])
        self.w2_scale.copy_(s2[..., 0])


def sort_by_expert(local_ids: torch.Tensor, is_local: torch.Tensor,
                   num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the flattened (token, slot) pairs by local expert, other ranks' pairs last.

    ``local_ids``/``is_local``: [num_tokens, top_k]. Returns (``order`` [num_tokens * top_k] indices
    into the flattened pairs, ``ends`` int32 [num_local_experts]: the end row of each expert's run
    in that order). Device-side only: no host synchronisation.
    """
    key = torch.where(is_local, local_ids, num_local_experts).flatten()  # [num_pairs]
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_local_experts + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return order, counts[:num_local_experts].cumsum(0).to(torch.int32)


def grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``[ends[g-1], ends[g])`` of ``x`` times ``weight_t[g]`` ([K, N]) for every group g."""
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, weight_t, offs=ends)


_GROUPED_SUPPORT: dict[tuple, bool] = {}


def grouped_mm_supported(dtype: torch.dtype, hidden_size: int, inter_per_rank: int) -> bool:
    """Whether the CUDA grouped GEMM runs this dtype and these widths (checked once, by trying)."""
    if dtype != torch.bfloat16 or (hidden_size * 2) % 16 or (inter_per_rank * 2) % 16:
        return False
    device = torch.cuda.current_device()
    key = (device, dtype)
    if key not in _GROUPED_SUPPORT:
        if torch.cuda.is_current_stream_capturing():
            return False  # cannot try a kernel now; the eager warm-up runs before any capture
        try:
            x = torch.zeros(16, 16, dtype=dtype, device="cuda")
            w = torch.zeros(2, 16, 16, dtype=dtype, device="cuda").transpose(1, 2)  # as w13.transpose(1, 2)
            grouped_mm(x, w, torch.tensor([8, 16], dtype=torch.int32, device="cuda"))
            _GROUPED_SUPPORT[key] = True
        except (RuntimeError, AttributeError, NotImplementedError):
            _GROUPED_SUPPORT[key] = False
    return _GROUPED_SUPPORT[key]
