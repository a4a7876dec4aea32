"""Random weights in the shape of a checkpoint, for benchmarks and GPU checks.

Each tensor is drawn from a generator seeded by the tensor's name, so every rank (and every
layout) cuts its slices from the same full tensor: tp=4 and tp=1 hold the same model.
"""
from __future__ import annotations

import zlib

import torch


class RandomCheckpoint:
    """Quacks like CheckpointReader: ``check`` learns the shapes, ``read`` returns slices."""

    def __init__(self, seed: int = 0, std: float = 0.02, device: torch.device | str | None = None):
        self.seed, self.std = seed, std
        self.device = device
        self._shapes: dict[str, tuple[int, ...]] = {}

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        self._shapes.update(expected)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shape = self._shapes[name]
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if name.endswith("norm.weight"):
            full = torch.ones(shape, device=device)
        else:
            gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(shape, device=device).normal_(0.0, self.std, generator=gen)
        if dim is None:
            return full
        return full.narrow(dim, start, (stop if stop is not None else shape[dim]) - start)

    def close(self) -> None:
        self._shapes.clear()
