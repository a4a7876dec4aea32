"""Each model module names its checkpoint tensors once; checking shapes and loading both read them."""
from __future__ import annotations

from meshlm.weights.checkpoint import CheckpointReader


class NamedWeights:
    """Mixin for modules whose ``weight_names(prefix)`` lists ``(part, args)`` pairs: ``part`` is a
    parallel layer or another NamedWeights module, ``args`` what its ``expected_shapes`` and
    ``load`` take after the reader (checkpoint names, or the prefix of a sub-module)."""

    def weight_names(self, prefix: str) -> list[tuple[object, tuple]]:
        raise NotImplementedError

    def expected_shapes(self, prefix: str) -> dict:
        shapes = {}
        for part, args in self.weight_names(prefix):
            shapes.update(part.expected_shapes(*args))
        return shapes

    def load(self, reader: CheckpointReader, prefix: str) -> None:
        for part, args in self.weight_names(prefix):
            part.load(reader, *args)
