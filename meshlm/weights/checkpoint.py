"""Reading a Hugging Face layout directory: config.json, safetensors (single or sharded).

A rank reads only its own slices: ``read(name, dim, start, stop)`` goes through safetensors'
``get_slice`` so the rest of the tensor never leaves the disk.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint that does not match the model its config describes."""


class CheckpointReader:
    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._file_of: dict[str, Path] = {}
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / fname for name, fname in weight_map.items()}
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.model_dir}: no *.safetensors files and no "
                                      "model.safetensors.index.json")
            for path in files:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        self._file_of[name] = path
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def _handle(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"checkpoint {self.model_dir} has no tensor {name!r}")
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or only ``[start:stop]`` along ``dim``."""
        if dim is None:
            return self._handle(name).get_tensor(name)  # also a 0-dim tensor (a scale), which slices refuse
        sl = self._handle(name).get_slice(name)
        index = [slice(None)] * len(sl.get_shape())
        index[dim] = slice(start, stop)
        return sl[tuple(index)]

    def check(self, expected: dict[str, tuple[int, ...] | frozenset[tuple[int, ...]]]) -> None:
        """Fail before loading if a tensor is missing or has the wrong shape; name them all.

        A shape may be a frozenset of the shapes a tensor may have (scales of a quantized layer)."""
        problems = []
        for name, shape in expected.items():
            accepted = sorted(shape) if isinstance(shape, frozenset) else [tuple(shape)]
            said = " or ".join(str(list(s)) for s in accepted)
            if name not in self._file_of:
                problems.append(f"missing tensor {name!r} (expected shape {said})")
            elif self.shape(name) not in accepted:
                problems.append(f"tensor {name!r} has shape {list(self.shape(name))}, "
                                f"the config implies {said}")
        if problems:
            raise CheckpointError(f"checkpoint {self.model_dir} does not match its config.json:\n  "
                                  + "\n  ".join(problems))

    def close(self) -> None:
        self._handles.clear()
