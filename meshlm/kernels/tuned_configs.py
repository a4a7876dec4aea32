"""Launch shapes measured on a named GPU, kept as JSON files beside the kernels.

A sweep on a card (e.g. ``benchmarks/fp8_gemm_bench.py --sweep --write-config``) writes the fastest
launch shape it found for each problem shape to ``configs/<kernel>_<device>.json``; the kernel's
tile chooser asks :func:`tuned_entry` first and falls back to its rule for shapes and cards the
file does not name. The file is plain data:

    {"kernel": "fp8_weight_gemm", "device": "NVIDIA H200",
     "entries": [{"n": 6144, "k": 4096, "max_rows": 1, "tiles": {"block_n": 64, ...}}, ...]}

An entry serves batches of up to ``max_rows`` rows (and more than the next smaller entry's) of a
weight of exactly ``n`` x ``k``.
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_path(kernel: str, device_name: str) -> Path:
    """configs/<kernel>_<device name with every run of other characters as one '_'>.json"""
    return CONFIG_DIR / f"{kernel}_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


@functools.cache
def _entries(kernel: str, device_name: str) -> tuple[tuple[int, int, int, dict], ...]:
    path = config_path(kernel, device_name)
    if not path.exists():
        return ()
    data = json.loads(path.read_text())
    entries = []
    for i, entry in enumerate(data.get("entries", [])):
        missing = {"n", "k", "max_rows", "tiles"} - set(entry)
        if missing:
            raise ValueError(f"{path}: entry {i} lacks {sorted(missing)}: {entry}")
        entries.append((int(entry["n"]), int(entry["k"]), int(entry["max_rows"]), dict(entry["tiles"])))
    return tuple(sorted(entries, key=lambda e: e[:3]))


def tuned_entry(kernel: str, device_name: str, n: int, k: int, num_rows: int) -> dict | None:
    """The launch-shape fields of the smallest entry for ``n`` x ``k`` that serves ``num_rows``
    rows on ``device_name``, or None."""
    for entry_n, entry_k, max_rows, tiles in _entries(kernel, device_name):
        if (entry_n, entry_k) == (n, k) and num_rows <= max_rows:
            return tiles
    return None


def small_batch_gemm_config(weight_dtype: torch.dtype) -> str:
    """The name under which the small-batch GEMM kernel (kernels/fp8_gemm_triton.py) keeps its
    launch shapes, by weight type: float8 weights and 16-bit ones are measured apart."""
    return "fp8_weight_gemm" if weight_dtype.itemsize == 1 else "bf16_weight_gemm"


@functools.cache
def device_name(device: torch.device) -> str:
    """The card's name as torch reports it ("NVIDIA H200"); "cpu" off the GPU."""
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)
