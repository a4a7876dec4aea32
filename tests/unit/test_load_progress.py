"""Weight loading shows a byte progress bar on rank 0 only, and counts what the model holds."""
from __future__ import annotations

import re

import torch

from tests.rank_groups import rank_groups
from meshlm.config import EngineConfig
from meshlm.executor.model_runner import ModelRunner
from meshlm.parallel.mapping import Mapping
from meshlm.weights.model_config import ModelConfig
from meshlm.weights.progress import LoadProgress

CONFIG = ModelConfig("LlamaForCausalLM", vocab_size=96, hidden_size=48, intermediate_size=96, num_layers=2,
                     num_heads=6, num_kv_heads=2, head_dim=8, max_position_embeddings=64)


class FakeReader:
    """Hands out zeros of the requested number of rows; records that it was closed."""

    def __init__(self):
        self.is_closed = False

    def read(self, name, dim=None, start=0, stop=None):
        return torch.zeros(stop - start, 10)

    def close(self):
        self.is_closed = True


def test_progress_counts_bytes_at_the_models_itemsize_and_stops_at_the_total():
    reader = FakeReader()
    progress = LoadProgress(reader, total_bytes=1000, itemsize=2, is_enabled=False)
    progress.read("a", 0, 0, 30)  # 300 elements of 2 bytes
    assert progress.num_bytes == 600
    progress.read("b", 0, 0, 30)  # 600 more would pass the total
    assert progress.num_bytes == 1000
    progress.close()
    assert progress.num_bytes == 1000 and reader.is_closed


def runner_stderr(capfd, rank: int) -> str:
    mapping = Mapping(2, rank, tp=2)
    groups = rank_groups(mapping)
    config = EngineConfig.for_random_weights(CONFIG, dtype="float32", max_model_len=64, tensor_parallel_size=2)
    ModelRunner(config, groups, torch.device("cpu"))
    return capfd.readouterr().err


def test_rank_0_draws_the_bar_in_bytes_and_the_other_ranks_stay_quiet(capfd):
    bar = re.compile(r"loading weights: +100%.*B/s")
    assert bar.search(runner_stderr(capfd, 0))
    assert not re.search(r"loading weights: +\d+%", runner_stderr(capfd, 1))
