"""Decode-graph batch buckets, the automatic max_batch_size, and the auto defaults of the engine's
GPU switches (what the CPU can check; the graphs themselves: tests/gpu/test_graph_buckets_gpu.py)."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch

from meshlm.config import EngineArgs, SchedulerConfig, auto_max_batch_size
from meshlm.executor.cuda_graphs import default_buckets, graph_memory_bytes
from meshlm.kernels.fused_ops import TORCH_OPS, select_ops


@pytest.mark.parametrize("max_batch_size", [1, 2, 3, 5, 8, 63, 64, 65, 100, 256, 300, 1000, 1024, 2048, 3000])
def test_buckets_cover_every_batch_size_with_little_padding(max_batch_size):
    buckets = default_buckets(max_batch_size)
    assert buckets == sorted(set(buckets)) and buckets[0] == 1 and buckets[-1] == max_batch_size
    for n in range(1, max_batch_size + 1):
        bucket = next(b for b in buckets if b >= n)
        # at most 7 padding rows up to 64, 15 up to 256, 31 up to 512, 63 beyond
        limit = 7 if n <= 64 else 15 if n <= 256 else 31 if n <= 512 else 63
        assert bucket - n <= limit, (n, bucket)


def test_buckets_are_the_documented_steps():
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_buckets(2048)[11:15] == [80, 96, 112, 128]
    assert [b for b in default_buckets(2048) if 256 < b <= 640] == [288, 320, 352, 384, 416, 448, 480, 512, 576, 640]
    assert len(default_buckets(2048)) == 55
    with pytest.raises(ValueError, match="max_batch_size=0"):
        default_buckets(0)


def test_graph_memory_grows_with_the_largest_bucket_only():
    small = graph_memory_bytes(256, 4096, 14336, 128256, 2)
    large = graph_memory_bytes(2048, 4096, 14336, 128256, 2)
    assert 8 * (small - 2**28) == large - 2**28
    assert large < 3 * 2**30  # about one largest graph: 2048 rows of an 8B model


def test_auto_max_batch_size_rule():
    assert auto_max_batch_size(10**9, is_gpu=False) == 256
    assert auto_max_batch_size(0, is_gpu=True) == 16
    assert auto_max_batch_size(100 * 256, is_gpu=True) == 96  # 100 sequences, down to a multiple of 16
    assert auto_max_batch_size(10**9, is_gpu=True) == 2048
    # Llama-3-8B in bf16 keeps 128 KiB of KV per token (32 layers x 2 x 8 heads x 128 x 2 bytes); a
    # 141 GB card at 0.9 utilisation leaves about 100 GB for the pool after the weights and reserves.
    tokens_8b_h200 = 100 * 10**9 // (32 * 2 * 8 * 128 * 2)
    assert auto_max_batch_size(tokens_8b_h200, is_gpu=True) >= 1024
    assert auto_max_batch_size(tokens_8b_h200, is_gpu=True) % 16 == 0


def test_max_batch_size_defaults_to_auto_and_is_still_checked():
    assert SchedulerConfig().max_batch_size is None and EngineArgs().max_batch_size is None
    with pytest.raises(ValueError, match="max_batch_size=0"):
        EngineArgs(max_batch_size=0)


def _parse(argv: list[str]) -> EngineArgs:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli(parser.parse_args(argv))


def test_fused_kernels_flag_is_auto_on_off():
    assert _parse([]).enable_fused_kernels is None
    assert _parse(["--enable-fused-kernels"]).enable_fused_kernels is True
    assert _parse(["--no-enable-fused-kernels"]).enable_fused_kernels is False
    assert EngineArgs(enable_fused_kernels=False).to_cli() == ["--no-enable-fused-kernels"]
    assert _parse(["--max-batch-size", "1000"]).max_batch_size == 1000


def test_auto_fused_kernels_stay_off_on_the_cpu_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="meshlm"):
        assert select_ops(None, torch.device("cpu")) is TORCH_OPS
    assert caplog.text == ""


def test_cpu_engine_resolves_max_batch_size_for_the_scheduler(tmp_path):
    from meshlm import LLM
    from tests.model_factory import make_random_model
    path = make_random_model(tmp_path / "m", "llama")
    with LLM(str(path), device="cpu", num_kv_blocks=16, block_size=4, max_model_len=64) as llm:
        assert llm.engine_core.max_batch_size == 256
        assert llm.local_model_runner().graph_runner is None
    with LLM(str(path), device="cpu", num_kv_blocks=16, block_size=4, max_model_len=64, max_batch_size=3) as llm:
        assert llm.engine_core.max_batch_size == 3


def test_short_context_graphs_cover_one_split_by_default_and_take_no_negative_length():
    from meshlm.executor import cuda_graphs
    from meshlm.kernels.decode_tiles import choose_num_splits
    tokens = cuda_graphs._SHORT_CONTEXT["tokens"]
    assert choose_num_splits(16, 8, tokens, 132) == 1 and choose_num_splits(16, 8, tokens + 1, 132) == 2
    with pytest.raises(ValueError, match="tokens=-1 must be >= 0"):
        cuda_graphs.set_short_context_graphs(-1)
    assert cuda_graphs._SHORT_CONTEXT["tokens"] == tokens
