"""Small set-up messages over MPI as JSON in byte buffers: mpi4py's lower-case calls would pickle
them, and a rank must never unpickle what arrives from the network."""
from __future__ import annotations

import json

import numpy as np


def bcast_json(comm, value=None, root: int = 0):
    """Collective: ``root`` passes a JSON-able value, every rank gets it back (lists stay lists)."""
    from mpi4py import MPI
    data = json.dumps(value).encode() if comm.Get_rank() == root else b""
    size = np.array([len(data)], dtype=np.int64)
    comm.Bcast([size, MPI.INT64_T], root=root)
    buffer = np.frombuffer(data, dtype=np.uint8).copy() if data else np.empty(int(size[0]), dtype=np.uint8)
    comm.Bcast([buffer, MPI.BYTE], root=root)
    return json.loads(buffer.tobytes())


def allgather_json(comm, value) -> list:
    """Collective: every rank passes a JSON-able value and gets every rank's, in rank order."""
    from mpi4py import MPI
    data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8).copy()
    sizes = np.zeros(comm.Get_size(), dtype=np.int64)
    comm.Allgather([np.array([len(data)], dtype=np.int64), MPI.INT64_T], [sizes, MPI.INT64_T])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    gathered = np.empty(int(sizes.sum()), dtype=np.uint8)
    comm.Allgatherv([data, MPI.BYTE], [gathered, sizes, offsets, MPI.BYTE])
    return [json.loads(gathered[o:o + s].tobytes()) for o, s in zip(offsets, sizes)]
