"""A rank's memory, planned from config.json alone: weights, KV cache per token, reserve, pool size.

One arithmetic for both users: ``meshlm plan`` (a dry run with no GPU and no weights) and the model
runner when it sizes its KV pool on a real card. Counts follow how the parallel layers shard:

- embedding and LM head: rows of the vocabulary padded up to a multiple of tp, split by tp; the
  first stage holds the embedding, the last the final norm and the LM head (with tied embeddings
  the last stage holds the embedding too, once, as the LM head's weight);
- attention: whole query heads split by tp; KV heads split by tp, or replicated (one per rank)
  when tp > num_kv_heads; norms replicated;
- dense MLP and Qwen2-MoE's shared expert: the intermediate width split by tp;
- experts: each of the moe_ep ranks holds num_experts / moe_ep experts, each moe_tp = tp / moe_ep
  wide slice of their width; the router is replicated;
- decoder layers: the contiguous range of this pipeline stage (Mapping.layer_range);
- FP8 (``quantization``): each linear weight one byte an element, a float32 scale per row and, for
  a checkpoint with static activation scales, one float32 input scale per layer (not per expert);
  the layers its ``ignore`` list names keep the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshlm.config import CacheConfig
from meshlm.executor.prompt_logprobs import ROWS_PER_SLICE as PROMPT_ROWS_PER_SLICE
from meshlm.executor.sampler import ROWS_PER_SLICE as SAMPLER_ROWS_PER_SLICE
from meshlm.kernels.kv_quant import kv_cache_itemsize
from meshlm.models.llama import attention_modules, mlp_modules
from meshlm.models.moe import expert_modules, expert_names
from meshlm.parallel.mapping import Mapping
from meshlm.weights.model_config import ModelConfig
from meshlm.weights.quantization import QuantizationConfig

GiB = 2**30
# Fixed part of the reserve: captured CUDA graphs, the allocator's fragmentation, NCCL buffers.
FIXED_RESERVE_BYTES = GiB
# Float32 copies of a slice of sampled rows' logits that the sampler holds at once (it samples
# sampler.ROWS_PER_SLICE rows at a time): the widened logits, their logprobs, the penalties' token
# counts, a sort's values and int64 indices, probabilities, noise. On an H200, 2048 rows of a 128k
# vocabulary sampled whole with every filter, penalty and 5 logprobs peaked at 10.8 GiB (about 11
# copies; benchmarks/activation_peak.py).
SAMPLER_LOGIT_COPIES = 12
# Float32 copies of a slice of scored prompt rows (prompt_logprobs.ROWS_PER_SLICE rows at a time):
# the logits, their log_softmax, the top-k's values.
PROMPT_LOGPROB_COPIES = 3


def num_kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """KV heads are split by tp, or replicated whole (one per rank) when tp > num_kv_heads."""
    return max(1, cfg.num_kv_heads // tp)


def kv_bytes_per_token(cfg: ModelConfig, mapping: Mapping, itemsize: int) -> int:
    """Bytes of K and V that one token takes in this rank's pool: its stage's layers, its KV heads."""
    num_layers = len(mapping.layer_range(cfg.num_layers))
    return 2 * num_layers * num_kv_heads_per_rank(cfg, mapping.tp) * cfg.head_dim * itemsize


def weight_bytes(cfg: ModelConfig, mapping: Mapping, itemsize: int) -> int:
    """Bytes of the parameters this rank holds (the sum of its model shard's parameters)."""
    hidden, tp = cfg.hidden_size, mapping.tp
    vocab_shard = -(-cfg.vocab_size // tp) * hidden  # [vocab_per_rank, hidden]
    num = 0  # elements in the model dtype
    linears: list[Linear] = []  # the linear layers' weights, float8 when quantized
    if mapping.is_first_pp_rank or (mapping.is_last_pp_rank and cfg.tie_word_embeddings):
        num += vocab_shard
    if mapping.is_last_pp_rank:
        num += hidden + (0 if cfg.tie_word_embeddings else vocab_shard)  # final norm, LM head
    for layer in mapping.layer_range(cfg.num_layers):
        prefix = f"model.layers.{layer}"
        num += 2 * hidden + _attention_extras(cfg, tp)  # two norms, biases and qk-norms
        linears += _attention_linears(cfg, tp, prefix)
        if cfg.is_moe_layer(layer):
            num += cfg.num_experts * hidden  # the router, replicated
            linears += _moe_linears(cfg, mapping, prefix)
            if cfg.shared_expert_intermediate_size:
                num += hidden  # the shared expert's gate
        else:
            linears += _mlp_linears(cfg, cfg.intermediate_size, tp, f"{prefix}.mlp")
    return num * itemsize + sum(linear.num_bytes(itemsize) for linear in linears)


@dataclass(frozen=True, slots=True)
class Linear:
    """One linear weight of a rank: ``rows`` x ``columns``, quantized by ``quant`` (None: the model
    dtype); ``is_expert``: no input scale of its own."""

    rows: int
    columns: int
    quant: QuantizationConfig | None
    is_expert: bool = False

    def num_bytes(self, itemsize: int) -> int:
        quant = self.quant
        if quant is None:
            return self.rows * self.columns * itemsize
        # float8 weight, a float32 scale per row, and a static input scale where the checkpoint has them
        input_scale = 4 if quant.is_static_input and not self.is_expert else 0
        return self.rows * self.columns + 4 * self.rows + input_scale


def _attention_extras(cfg: ModelConfig, tp: int) -> int:
    num = 0
    if cfg.attention_bias:
        num += (cfg.num_heads // tp + 2 * num_kv_heads_per_rank(cfg, tp)) * cfg.head_dim
    if cfg.qk_norm:
        num += 2 * cfg.head_dim
    return num


def _attention_linears(cfg: ModelConfig, tp: int, prefix: str) -> list[Linear]:
    q_width = cfg.num_heads // tp * cfg.head_dim
    kv_width = num_kv_heads_per_rank(cfg, tp) * cfg.head_dim
    qkv, o = attention_modules(prefix)
    return [Linear(q_width + 2 * kv_width, cfg.hidden_size, cfg.layer_quantization(qkv)),
            Linear(cfg.hidden_size, q_width, cfg.layer_quantization([o]))]


def _mlp_linears(cfg: ModelConfig, intermediate: int, tp: int, prefix: str) -> list[Linear]:
    gate_up, down = mlp_modules(prefix)
    hidden = cfg.hidden_size
    return [Linear(2 * (intermediate // tp), hidden, cfg.layer_quantization(gate_up)),
            Linear(hidden, intermediate // tp, cfg.layer_quantization([down]))]


def _moe_linears(cfg: ModelConfig, mapping: Mapping, prefix: str) -> list[Linear]:
    hidden, width = cfg.hidden_size, cfg.moe_intermediate_size // mapping.moe_tp
    num_local_experts = cfg.num_experts // mapping.moe_ep
    block, names = expert_names(cfg, prefix)
    quant = cfg.layer_quantization(expert_modules(cfg, names))
    linears = [Linear(num_local_experts * 2 * width, hidden, quant, True),
               Linear(num_local_experts * hidden, width, quant, True)]
    if cfg.shared_expert_intermediate_size:
        linears += _mlp_linears(cfg, cfg.shared_expert_intermediate_size, mapping.tp, f"{block}.shared_expert")
    return linears


def activation_reserve_bytes(cfg: ModelConfig, tp: int, max_num_tokens: int, max_batch_size: int,
                             itemsize: int) -> int:
    """Memory kept out of the KV pool for the largest step: activations, logits, graphs.

    Per token of a step, a bound on the widest tensors alive at once, in the activations' element
    size (``itemsize``, the model dtype's; float32 for MoE models, whose routed rows take several
    experts' widths): four intermediate-width rows (the MLP's gate/up output, its SiLU product,
    room for one more) and eight hidden-width ones. Then the step's logits (``max_batch_size``
    rows, at most float32), the float32 copies the sampler or the prompt logprobs make of one
    slice of them, and a fixed part (FIXED_RESERVE_BYTES).
    """
    element = 4 if cfg.is_moe else itemsize
    per_token = (4 * cfg.intermediate_size // tp + 8 * cfg.hidden_size) * element
    return max_num_tokens * per_token + logits_reserve_bytes(cfg, max_batch_size) + FIXED_RESERVE_BYTES


def logits_reserve_bytes(cfg: ModelConfig, max_batch_size: int) -> int:
    """The reserve's part for logits: a step's rows, and the copies of one slice of them."""
    copies = max(SAMPLER_LOGIT_COPIES * min(max_batch_size, SAMPLER_ROWS_PER_SLICE),
                 PROMPT_LOGPROB_COPIES * PROMPT_ROWS_PER_SLICE)
    return (max_batch_size + copies) * cfg.vocab_size * 4


def kv_blocks_that_fit(total_bytes: int, gpu_memory_utilization: float, used_bytes: int, reserve_bytes: int,
                       bytes_per_block: int) -> int:
    """Blocks the scheduler may use: ``utilization x total``, less what is used and the reserve,
    in whole blocks, less the one scratch block the runner adds (<= 0: none fit)."""
    budget = int(total_bytes * gpu_memory_utilization) - used_bytes - reserve_bytes
    return budget // max(1, bytes_per_block) - 1


@dataclass(frozen=True, slots=True)
class RankPlan:
    """What one rank holds at a given card size; ``num_blocks`` <= 0 when the weights leave no room."""

    mapping: Mapping
    weight_bytes: int
    kv_bytes_per_token: int
    reserve_bytes: int
    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return max(0, self.num_blocks) * self.block_size


def plan_rank(cfg: ModelConfig, mapping: Mapping, itemsize: int, total_bytes: int, cache: CacheConfig,
              max_num_tokens: int, max_batch_size: int, with_graphs: bool = False,
              num_speculative_tokens: int = 0) -> RankPlan:
    """The memory of rank ``mapping.rank`` on a card of ``total_bytes``, before anything is loaded
    (``num_speculative_tokens``: the verify graphs of speculative decoding with the decode graphs)."""
    weights = weight_bytes(cfg, mapping, itemsize)
    per_token = kv_bytes_per_token(cfg, mapping, kv_cache_itemsize(cache.cache_dtype, itemsize))
    reserve = activation_reserve_bytes(cfg, mapping.tp, max_num_tokens, max_batch_size, itemsize)
    if with_graphs:
        reserve += graph_reserve_bytes(cfg, mapping, itemsize, max_batch_size, num_speculative_tokens)
    blocks = kv_blocks_that_fit(total_bytes, cache.gpu_memory_utilization, weights, reserve,
                                per_token * cache.block_size)
    return RankPlan(mapping, weights, per_token, reserve, blocks, cache.block_size)


def check_weights_fit(plan: RankPlan, total_bytes: int, gpu_memory_utilization: float, dtype_name: str) -> None:
    """Refuse a layout whose weights, with the reserve and one KV block, exceed the card's share."""
    if plan.num_blocks >= 1:
        return
    m = plan.mapping
    share = total_bytes * gpu_memory_utilization
    raise ValueError(
        f"{m.describe()}: weights of {plan.weight_bytes / GiB:.2f} GiB plus the activation reserve of "
        f"{plan.reserve_bytes / GiB:.2f} GiB do not leave room for the KV cache in "
        f"gpu_memory_utilization={gpu_memory_utilization} x {total_bytes / GiB:.1f} GiB = {share / GiB:.2f} GiB; "
        f"raise tp (now {m.tp}) or pp (now {m.pp}), pick a smaller dtype (now {dtype_name}), "
        f"raise gpu_memory_utilization, or lower max_num_tokens / max_batch_size")


def check_pool_holds_a_request(num_blocks: int, block_size: int, max_model_len: int, cache: CacheConfig,
                               device_type: str, tp: int) -> None:
    """Refuse a KV pool that cannot hold one request of ``max_model_len`` tokens (never truncate)."""
    needed = -(-max_model_len // block_size)
    if num_blocks >= needed:
        return
    if cache.num_blocks is not None:
        grow = f"raise num_kv_blocks (now {cache.num_blocks}) to at least {needed}"
    elif device_type == "cpu":
        grow = f"raise cpu_kv_cache_gb (now {cache.cpu_kv_cache_gb})"
    else:
        grow = (f"raise gpu_memory_utilization (now {cache.gpu_memory_utilization}) "
                f"or tp (now {tp}) to free memory for it")
    raise ValueError(
        f"the KV cache holds {num_blocks} blocks of {block_size} tokens = {num_blocks * block_size} tokens, "
        f"fewer than one request of max_model_len={max_model_len} ({needed} blocks); lower max_model_len "
        f"to at most {num_blocks * block_size}, or {grow}")


def graph_reserve_bytes(cfg: ModelConfig, mapping: Mapping, itemsize: int, max_batch_size: int,
                        num_speculative_tokens: int = 0) -> int:
    """What the decode graphs of every bucket up to ``max_batch_size`` hold on this rank (an upper
    estimate: one shared pool of the largest graph's temporaries and its logits, see cuda_graphs),
    and with speculative decoding (``num_speculative_tokens`` > 0) the verify graphs (verify_graphs)."""
    from meshlm.executor.cuda_graphs import graph_memory_bytes
    from meshlm.executor.verify_graphs import verify_graph_memory_bytes
    widest_mlp = max(cfg.intermediate_size, cfg.num_experts_per_tok * (cfg.moe_intermediate_size or 0)
                     + cfg.shared_expert_intermediate_size)
    vocab_per_rank = -(-cfg.vocab_size // mapping.tp) if mapping.is_last_pp_rank else 0
    shape = (cfg.hidden_size, -(-widest_mlp // mapping.tp), vocab_per_rank, itemsize)
    reserve = graph_memory_bytes(max_batch_size, *shape)
    if num_speculative_tokens:
        reserve += verify_graph_memory_bytes(max_batch_size, num_speculative_tokens, *shape)
    return reserve
