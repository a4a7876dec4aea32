"""Communicators: one interface, three backends.

- ``SingleRankComm``: a group of one; every collective is the identity.
- ``MPIComm``: mpi4py on CPU tensors (the CPU path and the distributed test suite).
- ``NcclComm``: NCCL through CuPy on torch's current CUDA stream (the GPU data plane). Calls
  enqueue work on the stream and return at once: no host synchronisation, so they can be
  captured in CUDA graphs.

Ranks passed to ``send``/``recv`` are *group* ranks. Every method is called by all
members of the group (``send``/``recv`` by the two peers only).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mpi4py import MPI


class Communicator:
    """A group of ranks that exchange tensors. Subclasses implement the collectives."""

    rank: int
    size: int
    ranks: list[int]  # global ranks of the members, in group order

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; every member gets the sum."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenation of every member's tensor along ``dim``, in group-rank order."""
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Group rank ``src``'s tensor into every member's ``tensor`` (same shape and dtype), in place."""
        raise NotImplementedError

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        raise NotImplementedError

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Fill ``tensor`` (of the sender's shape and dtype) from group rank ``src``."""
        raise NotImplementedError

    def destroy(self) -> None:
        """Release backend resources; call before the process exits."""


class SingleRankComm(Communicator):
    def __init__(self, global_rank: int = 0):
        self.rank, self.size, self.ranks = 0, 1, [global_rank]

    def all_reduce(self, tensor):
        return tensor

    def all_gather(self, tensor, dim=0):
        return tensor

    def broadcast(self, tensor, src):
        return tensor

    def send(self, tensor, dst):
        raise RuntimeError("send in a group of one")

    def recv(self, tensor, src):
        raise RuntimeError("recv in a group of one")


_REDUCIBLE = {torch.float32, torch.float64, torch.int32, torch.int64}


def _as_buffer(tensor: torch.Tensor):
    """A writable numpy view of a contiguous CPU tensor (bf16/fp16 viewed as raw 16-bit ints)."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous(), "MPI needs contiguous CPU tensors"
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


class MPIComm(Communicator):
    """Collectives over an mpi4py communicator, on CPU tensors."""

    def __init__(self, comm: "MPI.Comm", global_ranks: list[int]):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.ranks = global_ranks

    def all_reduce(self, tensor):
        from mpi4py import MPI
        if tensor.dtype in _REDUCIBLE:
            self.comm.Allreduce(MPI.IN_PLACE, _as_buffer(tensor), op=MPI.SUM)
            return tensor
        # 16-bit floats: MPI has no such type; sum in fp32 and round once.
        wide = tensor.float().contiguous()
        self.comm.Allreduce(MPI.IN_PLACE, wide.numpy(), op=MPI.SUM)
        tensor.copy_(wide)
        return tensor

    def all_gather(self, tensor, dim=0):
        tensor = tensor.contiguous()
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype)
        self.comm.Allgather(_as_buffer(tensor), _as_buffer(out))
        # [size, *shape] -> concatenated along dim
        return torch.cat(out.unbind(0), dim=dim)

    def broadcast(self, tensor, src):
        self.comm.Bcast(_as_buffer(tensor), root=src)
        return tensor

    def send(self, tensor, dst):
        self.comm.Send(_as_buffer(tensor.contiguous()), dest=dst, tag=7)

    def recv(self, tensor, src):
        self.comm.Recv(_as_buffer(tensor), source=src, tag=7)
        return tensor

    def destroy(self):
        if self.comm is not None:
            from mpi4py import MPI
            if self.comm not in (MPI.COMM_WORLD, MPI.COMM_SELF):
                self.comm.Free()
            self.comm = None


class NcclComm(Communicator):
    """NCCL through CuPy; the unique id travels over the group's MPI communicator."""

    def __init__(self, mpi_comm: "MPI.Comm", global_ranks: list[int], device: torch.device):
        from cupy.cuda import nccl
        self._nccl = nccl
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.ranks = global_ranks
        self.device = device
        self.mpi_comm = mpi_comm
        from meshlm.launcher.mpi_json import bcast_json
        uid = tuple(bcast_json(mpi_comm, list(nccl.get_unique_id()) if self.rank == 0 else None))
        with torch.cuda.device(device):
            self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {
            torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
            torch.bfloat16: nccl.NCCL_BFLOAT16, torch.int32: nccl.NCCL_INT32,
            torch.int64: nccl.NCCL_INT64, torch.uint8: nccl.NCCL_UINT8,
        }

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def all_reduce(self, tensor):
        assert tensor.is_contiguous()
        self.comm.allReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                            self._dtypes[tensor.dtype], self._nccl.NCCL_SUM, self._stream())
        return tensor

    def all_gather(self, tensor, dim=0):
        tensor = tensor.contiguous()
        out = torch.empty((self.size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        self.comm.allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(),
                            self._dtypes[tensor.dtype], self._stream())
        if dim == 0:
            return out.view(self.size * tensor.shape[0], *tensor.shape[1:])
        return torch.cat(out.unbind(0), dim=dim)

    def broadcast(self, tensor, src):
        assert tensor.is_contiguous()
        self.comm.broadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtypes[tensor.dtype],
                            src, self._stream())
        return tensor

    def send(self, tensor, dst):
        tensor = tensor.contiguous()
        self.comm.send(tensor.data_ptr(), tensor.numel(), self._dtypes[tensor.dtype], dst, self._stream())

    def recv(self, tensor, src):
        self.comm.recv(tensor.data_ptr(), tensor.numel(), self._dtypes[tensor.dtype], src, self._stream())
        return tensor

    def destroy(self):
        if self.comm is not None:
            torch.cuda.synchronize(self.device)
            self.comm.destroy()
            self.comm = None
