"""Launch shapes recorded by a sweep for a named card (meshlm/kernels/tuned_configs.py)."""
from __future__ import annotations

import json

import pytest

from meshlm.kernels import tuned_configs


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned_configs, "CONFIG_DIR", tmp_path)
    tuned_configs._entries.cache_clear()
    yield tmp_path
    tuned_configs._entries.cache_clear()


def _write(path, entries):
    path.write_text(json.dumps({"kernel": "k", "device": "Card X-1", "entries": entries}))


def test_file_name_from_the_card_name(config_dir):
    assert tuned_configs.config_path("fp8_weight_gemm", "NVIDIA H200 (141 GB)").name == \
        "fp8_weight_gemm_NVIDIA_H200_141_GB.json"


def test_smallest_entry_that_serves_the_rows(config_dir):
    _write(tuned_configs.config_path("k", "Card X-1"), [
        {"n": 64, "k": 128, "max_rows": 16, "tiles": {"block_n": 16}},
        {"n": 64, "k": 128, "max_rows": 1, "tiles": {"block_n": 1}},
        {"n": 64, "k": 128, "max_rows": 4, "tiles": {"block_n": 4}},
        {"n": 32, "k": 128, "max_rows": 16, "tiles": {"block_n": 99}},
    ])
    picks = [tuned_configs.tuned_entry("k", "Card X-1", 64, 128, rows) for rows in (1, 2, 4, 5, 16)]
    assert [p["block_n"] for p in picks] == [1, 4, 4, 16, 16]
    assert tuned_configs.tuned_entry("k", "Card X-1", 64, 128, 17) is None  # past every entry
    assert tuned_configs.tuned_entry("k", "Card X-1", 64, 256, 1) is None  # another shape
    assert tuned_configs.tuned_entry("k", "Other card", 64, 128, 1) is None  # no file


def test_malformed_entry_names_the_file(config_dir):
    path = tuned_configs.config_path("k", "Card X-1")
    _write(path, [{"n": 64, "k": 128, "tiles": {}}])
    with pytest.raises(ValueError, match=r"entry 0 lacks \['max_rows'\]") as info:
        tuned_configs.tuned_entry("k", "Card X-1", 64, 128, 1)
    assert str(path) in str(info.value)
