"""The communicators one rank needs, built from its Mapping, with named collectives.

Layers receive ``groups.tp`` (a Communicator) and never ask the world for ranks. The
pipeline hand-off and the logits gather are named after what each rank gets back.

For MoE layers the TP group is re-partitioned into ``moe_tp x moe_ep`` (see Mapping); the
experts' partial sums are combined with one all-reduce over the TP group, so MoE layers need no
communicator of their own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from meshlm.parallel.comm import Communicator, MPIComm, NcclComm, SingleRankComm
from meshlm.parallel.mapping import Mapping


@dataclass(slots=True)
class ParallelGroups:
    mapping: Mapping
    tp: Communicator
    pp: Communicator

    @classmethod
    def single(cls) -> "ParallelGroups":
        return cls(Mapping(), SingleRankComm(), SingleRankComm())

    @classmethod
    def from_mpi(cls, mapping: Mapping, device: torch.device) -> "ParallelGroups":
        """Split MPI.COMM_WORLD into this rank's TP and PP groups.

        Collective over the whole world: every rank must call it. On CUDA devices the groups
        are NCCL communicators; on the CPU, MPI ones.
        """
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        if world.Get_size() != mapping.world_size:
            raise RuntimeError(f"MPI world has {world.Get_size()} ranks but the mapping expects "
                               f"{mapping.world_size}")

        def make(members: list[int]) -> Communicator:
            sub = world.Split(color=members[0], key=mapping.rank)
            if len(members) == 1:
                sub.Free()
                return SingleRankComm(mapping.rank)
            if device.type == "cuda":
                comm = NcclComm(sub, members, device)
                return comm
            return MPIComm(sub, members)

        # Split order is the same on every rank: TP groups first, then PP groups.
        tp = make(mapping.tp_group)
        pp = make(mapping.pp_group)
        return cls(mapping, tp, pp)

    # --- named collectives -------------------------------------------------------------------
    def gather_logits_to_sampler(self, logits_shard: torch.Tensor) -> torch.Tensor | None:
        """Concatenate vocab shards ``[num_rows, vocab_per_rank]`` along the vocab dim.

        Called by every TP rank of the last stage. The sampler (TP rank 0) gets
        ``[num_rows, vocab_per_rank * tp]``; the other ranks get None.
        """
        if self.tp.size == 1:
            return logits_shard
        full = self.tp.all_gather(logits_shard, dim=1)
        return full if self.tp.rank == 0 else None

    def broadcast_sampled_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The sampler's token ids ``[num_rows]`` int64 to every TP rank of its stage, so that each
        can feed them to the next step's input ids (the overlapped loop).

        Called by every TP rank of the last stage; the sampler (TP rank 0) passes its tokens, the
        others a buffer of the same shape, which they get back filled. Blocks on the CPU; on the
        GPU it is enqueued on the stream.
        """
        return self.tp.broadcast(token_ids, 0)

    def send_to_next_stage(self, hidden: torch.Tensor) -> None:
        """Send this stage's hidden states to the same TP rank of the next stage (non-blocking on GPU)."""
        self.pp.send(hidden, self.pp.rank + 1)

    def recv_from_prev_stage(self, shape: tuple[int, ...], dtype: torch.dtype,
                             device: torch.device) -> torch.Tensor:
        """Receive the previous stage's hidden states, of the given shape."""
        buf = torch.empty(shape, dtype=dtype, device=device)
        return self.pp.recv(buf, self.pp.rank - 1)

    def combine_from_experts(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum the experts' partial outputs ``[num_tokens, hidden]`` over the TP group, in place.

        Called by every TP rank after its experts ran; blocks like any all-reduce (on the GPU it
        is enqueued on the stream). Since moe_tp x moe_ep = tp, one sum adds both the other
        experts' contributions and the other slices of each expert; every TP rank gets the sum.
        """
        return self.tp.all_reduce(partial)

    def destroy(self) -> None:
        self.tp.destroy()
        self.pp.destroy()
