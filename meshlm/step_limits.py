"""How large a step may be when the user leaves it to the engine: the automatic ``max_num_tokens``
and ``max_batch_size`` (:class:`meshlm.config.SchedulerConfig`), from the card and the KV pool."""
from __future__ import annotations

DEFAULT_MAX_NUM_TOKENS = 8192
LARGE_CARD_MAX_NUM_TOKENS = 16384
LARGE_CARD_BYTES = 70 * 2**30
SERVER_MAX_NUM_TOKENS = 8192


def auto_max_num_tokens(gpu_memory_bytes: int | None) -> int:
    """The ``max_num_tokens`` of ``None``, vLLM's offline rule: 16384 tokens a step on a GPU of
    ``LARGE_CARD_BYTES`` (70 GiB) or more, 8192 on smaller GPUs and on the CPU
    (``gpu_memory_bytes`` None). ``meshlm serve`` takes ``SERVER_MAX_NUM_TOKENS`` (8192) instead,
    as vLLM's server does on large cards: a step of 16384 prompt tokens delays every running
    request's next token by as much."""
    if gpu_memory_bytes is not None and gpu_memory_bytes >= LARGE_CARD_BYTES:
        return LARGE_CARD_MAX_NUM_TOKENS
    return DEFAULT_MAX_NUM_TOKENS


AUTO_TOKENS_PER_SEQ = 256  # the short sequence the automatic max_batch_size plans for
AUTO_MAX_BATCH_SIZE = 2048
AUTO_MIN_BATCH_SIZE = 16
CPU_MAX_BATCH_SIZE = 256


def auto_max_batch_size(num_kv_tokens: int, is_gpu: bool) -> int:
    """The ``max_batch_size`` of ``None``: the KV pool's tokens (the minimum over ranks) at
    ``AUTO_TOKENS_PER_SEQ`` a sequence, a multiple of 16 in [16, 2048]; 256 on the CPU. Beyond the
    pool's share of short sequences a larger batch could only preempt, and every batch size up to
    this one gets a decode graph (whose memory grows with it)."""
    if not is_gpu:
        return CPU_MAX_BATCH_SIZE
    fitting = num_kv_tokens // AUTO_TOKENS_PER_SEQ // 16 * 16
    return max(AUTO_MIN_BATCH_SIZE, min(AUTO_MAX_BATCH_SIZE, fitting))
