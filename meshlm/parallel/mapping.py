"""Where a rank sits in the parallel layout: pure arithmetic, no torch, no MPI.

Ranks are ordered tensor-parallel fastest, then pipeline (as in TensorRT-LLM), so that a TP
group holds consecutive ranks and stays inside one node. For MoE layers each TP group is
re-partitioned into ``moe_tp x moe_ep = tp``: expert-parallel fastest inside the TP group.

Worked rank table for ``Mapping(world_size=16, rank=r, tp=4, pp=2, moe_ep=2, gpus_per_node=8)``
(16 ranks are two data-parallel replicas of the 8-rank model; ``dp`` counts them)::

    rank  node local | dp  pp  tp | moe_tp moe_ep | tp_group          pp_group
       0     0     0 |  0   0   0 |    0      0   | [0, 1, 2, 3]      [0, 4]
       1     0     1 |  0   0   1 |    0      1   | [0, 1, 2, 3]      [1, 5]
       2     0     2 |  0   0   2 |    1      0   | [0, 1, 2, 3]      [2, 6]
       3     0     3 |  0   0   3 |    1      1   | [0, 1, 2, 3]      [3, 7]
       4     0     4 |  0   1   0 |    0      0   | [4, 5, 6, 7]      [0, 4]
       5     0     5 |  0   1   1 |    0      1   | [4, 5, 6, 7]      [1, 5]
       6     0     6 |  0   1   2 |    1      0   | [4, 5, 6, 7]      [2, 6]
       7     0     7 |  0   1   3 |    1      1   | [4, 5, 6, 7]      [3, 7]
       8     1     0 |  1   0   0 |    0      0   | [8, 9, 10, 11]    [8, 12]
      ...
      15     1     7 |  1   1   3 |    1      1   | [12, 13, 14, 15]  [11, 15]

The moe_ep group of rank 1 is [0, 1] (same moe_tp rank, varying ep); its moe_tp group is [1, 3].
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Mapping:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    pp: int = 1
    moe_ep: int = 1
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        degrees = (f"world_size={self.world_size}, rank={self.rank}, tp={self.tp}, pp={self.pp}, "
                   f"moe_ep={self.moe_ep}, gpus_per_node={self.gpus_per_node}")
        if min(self.world_size, self.tp, self.pp, self.moe_ep, self.gpus_per_node) < 1:
            raise ValueError(f"every parallel degree must be >= 1 ({degrees})")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(f"world_size must be a multiple of tp*pp={self.tp * self.pp} ({degrees})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size) ({degrees})")
        if self.tp % self.moe_ep:
            raise ValueError(f"moe_ep must divide tp, since moe_tp*moe_ep = tp ({degrees})")

    # --- sizes -------------------------------------------------------------------------------
    @property
    def model_size(self) -> int:
        """Ranks that hold one copy of the model."""
        return self.tp * self.pp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_size

    @property
    def moe_tp(self) -> int:
        return self.tp // self.moe_ep

    # --- coordinates -------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return (self.rank // self.tp) % self.pp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.model_size

    @property
    def moe_ep_rank(self) -> int:
        return self.tp_rank % self.moe_ep

    @property
    def moe_tp_rank(self) -> int:
        return self.tp_rank // self.moe_ep

    @property
    def node_rank(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.gpus_per_node

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp - 1

    # --- groups (lists of global ranks) ------------------------------------------------------
    @property
    def _replica_base(self) -> int:
        return self.dp_rank * self.model_size

    @property
    def tp_group(self) -> list[int]:
        start = self._replica_base + self.pp_rank * self.tp
        return list(range(start, start + self.tp))

    @property
    def pp_group(self) -> list[int]:
        return [self._replica_base + stage * self.tp + self.tp_rank for stage in range(self.pp)]

    @property
    def moe_ep_group(self) -> list[int]:
        first = self.tp_group[0] + self.moe_tp_rank * self.moe_ep
        return list(range(first, first + self.moe_ep))

    @property
    def moe_tp_group(self) -> list[int]:
        first = self.tp_group[0] + self.moe_ep_rank
        return list(range(first, first + self.tp, self.moe_ep))

    @property
    def prev_pp_rank(self) -> int | None:
        """Global rank of the previous stage's peer, or None on the first stage."""
        return None if self.is_first_pp_rank else self.rank - self.tp

    @property
    def next_pp_rank(self) -> int | None:
        return None if self.is_last_pp_rank else self.rank + self.tp

    @property
    def sampler_rank(self) -> int:
        """The rank that samples: tp rank 0 of the last pipeline stage of this replica."""
        return self._replica_base + (self.pp - 1) * self.tp

    def describe(self) -> str:
        """Short coordinates for log prefixes."""
        parts = [f"rank {self.rank}"]
        if self.tp > 1:
            parts.append(f"tp {self.tp_rank}/{self.tp}")
        if self.pp > 1:
            parts.append(f"pp {self.pp_rank}/{self.pp}")
        if self.moe_ep > 1:
            parts.append(f"ep {self.moe_ep_rank}/{self.moe_ep}")
        return " ".join(parts)

    def layer_range(self, num_layers: int) -> range:
        """The contiguous range of decoder layers this pipeline stage holds.

        Layers are split as evenly as possible; earlier stages take the remainder, since the last
        stage also runs the LM head.
        """
        if num_layers < self.pp:
            raise ValueError(f"pp={self.pp} is larger than the model's {num_layers} layers")
        base, extra = divmod(num_layers, self.pp)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))
