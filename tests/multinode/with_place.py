"""``python with_place.py ARGS...``: print this rank's place, then run ``meshlm ARGS`` in this process.

The multi-node Slurm test gives it to slurm/generate.sbatch as MESHLM, so the job runs the real
command line and every rank also reports, on stderr, what meshlm's launcher sees:
``[place] {"rank", "size", "local_rank", "local_size", "host"}``.
"""
from __future__ import annotations

import json
import socket
import sys


def main() -> int:
    from meshlm.launcher.world import init_world
    world = init_world()
    place = {"rank": world.rank, "size": world.size, "local_rank": world.local_rank,
             "local_size": world.local_size, "host": socket.gethostname()}
    print(f"[place] {json.dumps(place)}", file=sys.stderr, flush=True)
    from meshlm.cli import main as meshlm_main
    return meshlm_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
