"""The messages between rank 0 and every rank: the envelope, the step plan and the step result.

Rank 0 broadcasts one ``Envelope`` per step; the sampling rank sends a ``StepResult`` back when
``returns_tokens(plan)``. On the wire both are flat byte buffers: a JSON header (kinds, request
ids, sampling parameters, array dtypes and shapes) followed by the raw bytes of the numpy arrays.
Nothing is pickled, so a rank never unpickles what arrives from the network. A request's sampling
parameters and prompt travel once, in the step that first schedules it.

Block tables travel as changes: rank 0 gives each sequence the ranks know a slot
(``StepPlan.seq_slots``), and both ends of the channel keep the table of every slot as last sent
(``BlockTableMirror``). A step carries, for each of its rows, the span of the row that differs
from that copy and the differing block ids only; a decode step whose sequences took no new block
sends none. Without slots (or without a mirror, as in tests) the whole table travels.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

import numpy as np

from meshlm.sampling_params import SamplingParams

_HEADER_BYTES = np.dtype("<u8").itemsize  # the buffer starts with the JSON header's length


class MessageKind(enum.IntEnum):
    STEP = 1  # run ``plan``
    SHUTDOWN = 2  # leave the worker loop; every rank then exits cleanly


@dataclass(slots=True)
class NewRequest:
    """A request the ranks have not seen: sent once, with the step that first schedules it."""

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
    # The overlapped loop: input tokens rank 0 does not know yet, sampled by the step before
    # (which has not reached rank 0). input_ids[prev_token_index[i]] is that step's sampled token
    # of row prev_token_rows[i]; the ranks take it from the device, and input_ids holds 0 there.
    prev_token_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [num_prev] int64
    prev_token_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [num_prev] int64
    # Prompt logprobs, only for the requests that asked: the packed token whose logits score the
    # next prompt token, that token, and how many top tokens its request wants.
    prompt_logprob_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [num_prompt_rows]
    prompt_logprob_target_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [num_prompt_rows]
    prompt_logprob_num_top: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [num_prompt_rows]
    # Copy-on-write of KV blocks several sequences shared: every rank copies block src to block dst
    # in each layer's K and V pools before the forward. A row of sample_rows may repeat: sequences
    # forked in this step sample their own tokens from the same last-token logits.
    block_copies: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # [num_copies, 2] (src, dst)
    # Speculative decoding: the draft tokens of each sample row, the last ones of its sequence's
    # query (after the last known token). Logits are taken at its last 1 + num_draft_tokens tokens.
    num_draft_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [num_samples] int32
    # Each sequence's slot among those the ranks know (distinct in a step; freed when it finishes):
    # the key of its block table row in BlockTableMirror. Empty: the table travels whole.
    seq_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # [num_seqs] int32

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @property
    def has_drafts(self) -> bool:
        return bool(len(self.num_draft_tokens)) and bool(self.num_draft_tokens.any())

    def logits_token_index(self) -> np.ndarray:
        """Indices into the step's tokens whose logits the sampler takes, sample row by sample row:
        the last ``1 + num_draft_tokens[i]`` tokens of sample row ``i``'s sequence. [num_logits] int64"""
        ends = self.query_start_loc[1:].astype(np.int64)[self.sample_rows]  # [num_samples]
        if not self.has_drafts:
            return ends - 1
        counts = 1 + self.num_draft_tokens.astype(np.int64)
        first = np.repeat(ends - counts, counts)  # [num_logits]
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return first + offsets

    @classmethod
    def empty(cls, finished_request_ids: list[str] | None = None) -> "StepPlan":
        """A plan that only carries request bookkeeping (no forward)."""
        i64, i32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
        return cls(i64, i64, i64, np.zeros(1, np.int32), i32, np.zeros((0, 1), np.int32), i64, [],
                   [], finished_request_ids or [])


_PLAN_ARRAYS = ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                "sample_rows", "prev_token_index", "prev_token_rows", "prompt_logprob_index",
                "prompt_logprob_target_ids", "prompt_logprob_num_top", "block_copies", "num_draft_tokens",
                "seq_slots")
_TABLE_CHANGES = ("table_first", "table_end", "table_changes")  # with "table_width" in the header


class BlockTableMirror:
    """The block table row of every sequence slot as the other end of the channel holds it.

    Rank 0 ``encode``s a step's tables against its mirror, every other rank ``decode``s them
    against its own; applied to every step in order, the two stay equal. Rows start as zeros; a
    row keeps whatever it last held past a step's width (both ends alike), so a slot taken over
    by another sequence needs no reset: what differs is simply sent."""

    def __init__(self) -> None:
        self.rows = np.zeros((0, 0), dtype=np.int32)  # [slots, widest table so far]

    def _fit(self, slots: np.ndarray, width: int) -> None:
        self.rows = fit_rows(self.rows, int(slots.max()) + 1 if len(slots) else 0, width)

    def encode(self, slots: np.ndarray, tables: np.ndarray) -> dict[str, np.ndarray]:
        """The changes of ``tables`` [num_seqs, width] (rows of ``slots``) from the mirror: per row
        the span ``[first, end)`` that differs (empty: first == end == width), and those ids."""
        tables = tables.astype(np.int32, copy=False)
        width = tables.shape[1]
        self._fit(slots, width)
        differs = self.rows[slots, :width] != tables
        changed = differs.any(axis=1)
        first = np.where(changed, differs.argmax(axis=1), width).astype(np.int32)
        end = np.where(changed, width - differs[:, ::-1].argmax(axis=1), width).astype(np.int32)
        self.rows[slots, :width] = tables
        return {"table_first": first, "table_end": end, "table_changes": tables[_span(first, end, width)]}

    def decode(self, slots: np.ndarray, width: int, first: np.ndarray, end: np.ndarray,
               changes: np.ndarray) -> np.ndarray:
        """The step's tables [num_seqs, width] from the mirror and ``encode``'s changes."""
        self._fit(slots, width)
        tables = self.rows[slots, :width]  # a copy
        tables[_span(first, end, width)] = changes
        self.rows[slots, :width] = tables
        return tables


def fit_rows(rows: np.ndarray, num_rows: int, width: int) -> np.ndarray:
    """``rows`` [r, w], or a copy grown to hold ``num_rows`` x ``width`` (zeros added): a dimension
    that must grow at least doubles, so a table widening a block at a time copies rarely."""
    old_rows, old_width = rows.shape
    if num_rows <= old_rows and width <= old_width:
        return rows
    grown = np.zeros((max(num_rows, 2 * old_rows) if num_rows > old_rows else old_rows,
                      max(width, 2 * old_width) if width > old_width else old_width), dtype=rows.dtype)
    grown[:old_rows, :old_width] = rows
    return grown


def _span(first: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """[num_seqs, width] mask of the columns in each row's ``[first, end)``."""
    columns = np.arange(width)
    return (columns >= first[:, None]) & (columns < end[:, None])


def returns_tokens(plan: StepPlan) -> bool:
    """Whether the step samples or scores prompt tokens: the sampling rank then sends a
    StepResult to rank 0."""
    return plan.num_tokens > 0 and (len(plan.sample_rows) > 0 or len(plan.prompt_logprob_index) > 0)


def samples_every_row_once(plan: StepPlan) -> bool:
    """Whether ``sample_rows`` is exactly ``0..num_seqs-1`` (no row skipped or repeated)."""
    return len(plan.sample_rows) == plan.num_seqs and bool((plan.sample_rows == np.arange(plan.num_seqs)).all())


@dataclass(slots=True)
class StepResult:
    """One step's sampled tokens, on the host.

    ``top_token_ids`` / ``top_logprobs`` have ``k_max`` columns, the most any row asked for; a row
    that asked for ``k < k_max`` uses its first ``k`` columns only.

    A step with draft tokens (speculative decoding) gives each row ``num_tokens[row]`` tokens, the
    accepted drafts and then one sampled token: ``token_ids`` is then [num_rows, 1 + max drafts],
    and the logprobs are those of each row's last token (rows with logprobs carry no drafts).
    """

    token_ids: np.ndarray  # int64 [num_rows], or [num_rows, 1 + max_drafts] with num_tokens
    logprobs: np.ndarray | None  # float32 [num_rows]: log-prob of each sampled token; None if no row asked
    top_token_ids: np.ndarray | None  # int64 [num_rows, k_max]; None if k_max == 0
    top_logprobs: np.ndarray | None  # float32 [num_rows, k_max]
    # The plan's prompt_logprob rows: each prompt token's logprob and the top ones (``k_max`` columns).
    prompt_logprobs: np.ndarray | None = None  # float32 [num_prompt_rows]
    prompt_top_token_ids: np.ndarray | None = None  # int64 [num_prompt_rows, k_max]; None if k_max == 0
    prompt_top_logprobs: np.ndarray | None = None  # float32 [num_prompt_rows, k_max]
    num_tokens: np.ndarray | None = None  # int64 [num_rows]: tokens of each row; None: one each
    # token_ids as Python ints, converted once for all rows at the first row_tokens (one token a row)
    _token_list: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    def row_tokens(self, row: int) -> list[int]:
        """The tokens sampled for ``row``, in order."""
        if self.num_tokens is None:
            if self._token_list is None:
                self._token_list = self.token_ids.tolist()
            return [self._token_list[row]]
        return self.token_ids[row, :int(self.num_tokens[row])].tolist()


_RESULT_ARRAYS = ("token_ids", "logprobs", "top_token_ids", "top_logprobs", "prompt_logprobs",
                  "prompt_top_token_ids", "prompt_top_logprobs", "num_tokens")


@dataclass(slots=True)
class Envelope:
    """What rank 0 broadcasts: a kind, and the plan when the kind is STEP."""

    kind: MessageKind
    plan: StepPlan | None = None


# --- the wire format ---------------------------------------------------------------------------

def encode_envelope(envelope: Envelope, tables: BlockTableMirror | None = None) -> np.ndarray:
    """The envelope as bytes; its block tables as changes from ``tables`` (updated) when given
    and the plan has slots, else whole."""
    header: dict = {"kind": int(envelope.kind)}
    arrays: dict[str, np.ndarray] = {}
    plan = envelope.plan
    if plan is not None:
        header["sample_request_ids"] = plan.sample_request_ids
        header["finished_request_ids"] = plan.finished_request_ids
        header["new_requests"] = [[r.request_id, r.params.to_dict(), r.prompt_token_ids]
                                  for r in plan.new_requests]
        arrays = {name: getattr(plan, name) for name in _PLAN_ARRAYS}
        if tables is not None and plan.num_seqs and len(plan.seq_slots) == plan.num_seqs:
            header["table_width"] = plan.block_tables.shape[1]
            arrays.update(tables.encode(plan.seq_slots, plan.block_tables))
        else:
            arrays["block_tables"] = plan.block_tables
    return _pack(header, arrays)


def decode_envelope(buffer: np.ndarray, tables: BlockTableMirror | None = None) -> Envelope:
    """The envelope ``encode_envelope`` wrote; block tables sent as changes need the receiving
    end's ``tables`` (updated)."""
    header, arrays = _unpack(buffer)
    kind = MessageKind(header["kind"])
    if kind != MessageKind.STEP:
        return Envelope(kind)
    new_requests = [NewRequest(rid, SamplingParams.from_dict(params), [int(t) for t in prompt])
                    for rid, params, prompt in header["new_requests"]]
    if "table_width" in header:
        if tables is None:
            raise ValueError("the step's block tables came as changes, and this end keeps no BlockTableMirror")
        block_tables = tables.decode(arrays["seq_slots"], header["table_width"],
                                     *(arrays[name] for name in _TABLE_CHANGES))
    else:
        block_tables = arrays["block_tables"]
    plan = StepPlan(**{name: arrays[name] for name in _PLAN_ARRAYS}, block_tables=block_tables,
                    sample_request_ids=header["sample_request_ids"], new_requests=new_requests,
                    finished_request_ids=header["finished_request_ids"])
    return Envelope(kind, plan)


def encode_result(result: StepResult) -> np.ndarray:
    arrays = {name: getattr(result, name) for name in _RESULT_ARRAYS if getattr(result, name) is not None}
    return _pack({}, arrays)


def decode_result(buffer: np.ndarray) -> StepResult:
    _, arrays = _unpack(buffer)
    return StepResult(**{name: arrays.get(name) for name in _RESULT_ARRAYS})


def _pack(header: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """``[header length: u8][JSON header][array bytes, in the header's order]`` as one uint8 array."""
    header = {**header, "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}
    head = json.dumps(header, separators=(",", ":")).encode()
    parts = [np.array([len(head)], dtype="<u8").view(np.uint8), np.frombuffer(head, np.uint8)]
    parts += [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays.values()]
    return np.concatenate(parts)


def _unpack(buffer: np.ndarray) -> tuple[dict, dict[str, np.ndarray]]:
    buffer = np.asarray(buffer, dtype=np.uint8)
    head_len = int(buffer[:_HEADER_BYTES].view("<u8")[0])
    offset = _HEADER_BYTES + head_len
    header = json.loads(buffer[_HEADER_BYTES:offset].tobytes())
    arrays = {}
    for name, dtype, shape in header.pop("arrays"):
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        arrays[name] = buffer[offset:offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != len(buffer):
        raise ValueError(f"a message of {len(buffer)} bytes holds {offset} bytes of header and arrays")
    return header, arrays
