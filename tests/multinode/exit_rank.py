"""Rank-side script of the multi-node exit test: join the world (rank table, lifelines), say
where this rank is and whether its lifeline to rank 0 connected, then end normally.

    mpiexec ... python tests/multinode/exit_rank.py
"""
from __future__ import annotations

import json
import socket


def main() -> int:
    from meshlm.launcher.world import init_world
    world = init_world()
    linked = sorted(world.monitor.peers) if world.monitor is not None else []
    print(f"[exit_rank] {json.dumps({'rank': world.rank, 'host': socket.gethostname(), 'linked': linked})}",
          flush=True)
    world.comm.Barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
