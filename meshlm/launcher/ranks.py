"""The rank table: which host and process id each rank of the world runs as.

Gathered once over MPI when the world starts, so that any rank can name a peer that died or
stopped answering by its host and pid, not just its number.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RankInfo:
    rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} (host {self.host}, pid {self.pid})"


def this_rank(rank: int) -> RankInfo:
    return RankInfo(rank, socket.gethostname(), os.getpid())


def gather_rank_table(comm) -> tuple[RankInfo, ...]:
    """Every rank calls this (an allgather over ``comm``) and gets the whole table, in rank order."""
    me = this_rank(comm.Get_rank())
    from meshlm.launcher.mpi_json import allgather_json
    return tuple(RankInfo(rank, host, pid) for rank, (host, pid) in
                 enumerate(allgather_json(comm, [me.host, me.pid])))


def all_on_one_host(table: tuple[RankInfo, ...]) -> bool:
    return len({info.host for info in table}) <= 1


def process_state(pid: int) -> str | None:
    """The state letter of a process on this host (R, S, T for stopped, Z, ...); None if gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]
