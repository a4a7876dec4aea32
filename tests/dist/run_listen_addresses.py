"""Rank-side script of the loopback test: every rank prints the addresses it listens on.

    mpiexec -n 3 python tests/dist/run_listen_addresses.py

After MPI is up (a barrier, then meshlm's init_world), each rank prints
``[listen] rank R addresses A,B,...``: the IP addresses of its listening TCP sockets, leaving
out the one socket every rank inherits from mpiexec (hydra's own control port, mpiexec's choice).
"""
from __future__ import annotations

import os
import sys

import psutil


def main() -> int:
    from meshlm.launcher.world import init_world
    world = init_world()
    world.comm.Barrier()
    me = psutil.Process(os.getpid())
    launcher_ports = {c.laddr.port for c in me.parent().parent().net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN}
    addresses = sorted({c.laddr.ip for c in me.net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN and c.laddr.port not in launcher_ports})
    print(f"[listen] rank {world.rank} of {world.size} addresses {','.join(addresses)}", flush=True)
    world.comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
