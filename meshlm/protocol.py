"""What rank 0 sends to every rank each step, and what comes back.

Typed commands over MPI: a ``Command`` tag and a dataclass payload. A step carries flat numpy
arrays; a request's sampling parameters and prompt travel once, in the step that admits it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from meshlm.sampling_params import SamplingParams


class Command(enum.IntEnum):
    STEP = 1
    SHUTDOWN = 2
    ABORT_JOB = 3  # rank 0 failed: every rank exits with an error


@dataclass(slots=True)
class NewRequest:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]


@dataclass(slots=True)
class StepPlan:
    """One forward step of a packed batch of ``num_seqs`` sequences and ``num_tokens`` tokens."""

    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    seq_lens: np.ndarray  # [num_seqs] int32
    block_tables: np.ndarray  # [num_seqs, max_blocks_per_seq] int32
    sample_rows: np.ndarray  # [num_samples] int64: sequences whose last token is sampled
    sample_request_ids: list[str]  # [num_samples]
    new_requests: list[NewRequest] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @classmethod
    def empty(cls, new_requests=None, finished_request_ids=None) -> "StepPlan":
        """A plan that only carries request bookkeeping (no forward)."""
        i64, i32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
        return cls(i64, i64, i64, np.zeros(1, np.int32), i32, np.zeros((0, 1), np.int32), i64, [],
                   new_requests or [], finished_request_ids or [])
