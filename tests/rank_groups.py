"""The parallel groups of one rank of a layout, built in a single process: each communicator knows
its rank and size, and its collectives are left undone (a test sums the ranks' results itself)."""
from __future__ import annotations

from meshlm.parallel.comm import Communicator
from meshlm.parallel.groups import ParallelGroups
from meshlm.parallel.mapping import Mapping


class RankComm(Communicator):
    """Rank ``rank`` of a group of ``size``; all_reduce returns this rank's part unchanged."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.ranks = rank, size, list(range(size))

    def all_reduce(self, tensor):
        return tensor


def rank_groups(mapping: Mapping) -> ParallelGroups:
    """The TP and PP groups of ``mapping``'s rank."""
    return ParallelGroups(mapping, RankComm(mapping.tp_rank, mapping.tp), RankComm(mapping.pp_rank, mapping.pp))
