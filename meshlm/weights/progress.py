"""A progress bar over weight loading: wraps a checkpoint reader and counts the bytes it hands out."""
from __future__ import annotations

import sys
import time

import torch


class LoadProgress:
    """Forwards every call to ``reader``; each ``read`` advances a tqdm bar (bytes, on stderr).

    ``total_bytes`` is what the model will hold (its parameters in their dtype); each read counts
    its elements at ``itemsize`` bytes, so a checkpoint in another dtype shows the model's bytes.
    A loader that reads more than it keeps (a fused expert tensor cut by moe_tp) stops at the
    total, and ``close`` completes the bar. With ``is_enabled`` false nothing is drawn.
    """

    def __init__(self, reader, total_bytes: int, itemsize: int, is_enabled: bool):
        self.reader = reader
        self.total_bytes, self.itemsize = total_bytes, itemsize
        self.num_bytes = 0
        self.start = time.perf_counter()
        self._bar = None
        if is_enabled:
            from tqdm import tqdm
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             desc="loading weights", file=sys.stderr, leave=True)

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def names(self) -> list[str]:
        return self.reader.names()

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        self.reader.check(expected)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor = self.reader.read(name, dim, start, stop)
        self._advance(min(tensor.numel() * self.itemsize, self.total_bytes - self.num_bytes))
        return tensor

    def _advance(self, num_bytes: int) -> None:
        self.num_bytes += num_bytes
        if self._bar is not None:
            self._bar.update(num_bytes)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        """Complete and close the bar, and close the reader."""
        self._advance(self.total_bytes - self.num_bytes)
        if self._bar is not None:
            self._bar.close()
        self.reader.close()
