"""A scheduled step as the flat arrays every rank runs: tokens, positions, KV slots, block tables.

Rank 0 builds them once for all ranks. With the overlapped loop, a decode may run on a token the
step still in flight samples: its input id is then a placeholder, and the plan names the row of
the previous step's sampled tokens that the ranks take from the device instead.
"""
from __future__ import annotations

import itertools

import numpy as np

from meshlm.engine.request import Request
from meshlm.engine.scheduler import ScheduledChunk
from meshlm.protocol import NewRequest, StepPlan, fit_rows

__all__ = ["BlockTableRows", "build_step_plan"]


def build_step_plan(chunks: list[ScheduledChunk], block_size: int, prev_sample_rows: dict[str, int],
                    new_requests: list[NewRequest], finished_request_ids: list[str],
                    block_copies: list[tuple[int, int]] = (), seq_slots: list[int] = (),
                    table_rows: BlockTableRows | None = None) -> StepPlan:
    """The StepPlan of ``chunks``. ``prev_sample_rows`` maps a request id to its row among the
    sampled tokens of the step in flight (empty when none is). A chunk that forks samples its row
    once for itself and once for each sequence it forked. ``seq_slots``: each chunk's sequence
    slot (StepPlan.seq_slots; empty: none); with them, ``table_rows`` keeps the tables between steps."""
    query_lens = np.array([c.num_new_tokens for c in chunks], dtype=np.int32)
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    query_start_loc = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    # Positions: each chunk's range start..start+len, packed.
    seq_index = np.repeat(np.arange(len(chunks)), query_lens)  # [num_tokens]
    positions = starts[seq_index] + (np.arange(num_tokens) - query_start_loc[:-1][seq_index])
    input_ids, prev_index, prev_rows = _input_ids(chunks, num_tokens, prev_sample_rows)
    if table_rows is not None and seq_slots:
        block_tables = table_rows.tables([c.request for c in chunks], seq_slots)
    else:
        block_tables = _block_tables([c.request.block_ids for c in chunks])
    slot_mapping = (block_tables[seq_index, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)
    samplers = [(i, r) for i, c in enumerate(chunks) if c.is_sampling
                for r in ((c.request, *c.forked) if c.forked else (c.request,))]
    num_draft_tokens = np.array([len(chunks[i].draft_token_ids) for i, _ in samplers], dtype=np.int32)
    scored_index, scored_targets, scored_num_top = _prompt_scores(chunks, query_start_loc)
    return StepPlan(
        input_ids=input_ids, positions=positions.astype(np.int64), slot_mapping=slot_mapping,
        query_start_loc=query_start_loc, seq_lens=(starts + query_lens).astype(np.int32),
        block_tables=block_tables, sample_rows=np.array([i for i, _ in samplers], dtype=np.int64),
        sample_request_ids=[r.request_id for _, r in samplers],
        new_requests=new_requests, finished_request_ids=finished_request_ids,
        prev_token_index=np.array(prev_index, dtype=np.int64), prev_token_rows=np.array(prev_rows, dtype=np.int64),
        prompt_logprob_index=scored_index, prompt_logprob_target_ids=scored_targets,
        prompt_logprob_num_top=scored_num_top, block_copies=np.array(block_copies, dtype=np.int64).reshape(-1, 2),
        num_draft_tokens=num_draft_tokens, seq_slots=np.array(seq_slots, dtype=np.int32))


class BlockTableRows:
    """Every sequence slot's block table as a row of one array, kept in step with its sequence's
    ``block_ids``: a step copies only the blocks appended since the step before, and rewrites a
    row whose blocks were swapped, freed or cut (``Request.block_table_version``) or whose slot
    another sequence has taken. So a step's tables cost O(sequences), not O(blocks)."""

    def __init__(self) -> None:
        self.rows = np.zeros((0, 0), dtype=np.int32)  # [slots, widest table so far]
        self._owner: list[Request | None] = []  # the sequence each row was last written for
        self._version: list[int] = []
        self._length: list[int] = []  # the row's columns written (zeros after)

    def tables(self, requests: list[Request], slots: list[int]) -> np.ndarray:
        """The block tables of ``requests`` (in ``slots``, distinct) [num_seqs, longest], zero-padded."""
        lengths = [len(r.block_ids) for r in requests]
        self._fit(max(slots) + 1, max(lengths))
        rows, owner, version, length = self.rows, self._owner, self._version, self._length
        for request, slot, n in zip(requests, slots, lengths):
            if owner[slot] is not request or version[slot] != request.block_table_version or n < length[slot]:
                rows[slot, :n] = request.block_ids
                rows[slot, n:length[slot]] = 0
                owner[slot], version[slot] = request, request.block_table_version
            elif n > length[slot]:  # appended blocks only
                rows[slot, length[slot]:n] = request.block_ids[length[slot]:]
            length[slot] = n
        return rows[slots, :max(lengths)]

    def _fit(self, num_slots: int, width: int) -> None:
        self.rows = fit_rows(self.rows, num_slots, width)
        extra = self.rows.shape[0] - len(self._owner)
        self._owner += [None] * extra
        self._version += [0] * extra
        self._length += [0] * extra


def _block_tables(tables: list[list[int]]) -> np.ndarray:
    """The block tables as one array [num_seqs, longest table], zero-padded."""
    lengths = np.array([len(t) for t in tables], dtype=np.int64)
    out = np.zeros((len(tables), int(lengths.max())), dtype=np.int32)
    out[np.arange(out.shape[1]) < lengths[:, None]] = list(itertools.chain.from_iterable(tables))
    return out


def _prompt_scores(chunks: list[ScheduledChunk], query_start_loc: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The packed tokens whose logits score the next prompt token, those tokens and each row's
    top-k, for the chunks of requests that asked for prompt logprobs (all [num_prompt_rows])."""
    index, targets, num_top = [], [], []
    for i, c in enumerate(chunks):
        if not c.num_scored:
            continue
        offset = int(query_start_loc[i]) + c.first_scored - c.start
        index.extend(range(offset, offset + c.num_scored))
        targets.extend(c.request.prompt_token_ids[c.first_scored + 1:c.first_scored + 1 + c.num_scored])
        num_top.extend([c.request.params.prompt_logprobs] * c.num_scored)
    return (np.array(index, dtype=np.int64), np.array(targets, dtype=np.int64),
            np.array(num_top, dtype=np.int64))


def _input_ids(chunks: list[ScheduledChunk], num_tokens: int,
               prev_sample_rows: dict[str, int]) -> tuple[np.ndarray, list[int], list[int]]:
    """The packed input ids [num_tokens], and where the step in flight's tokens go: (indices into
    the input ids, rows of that step's sampled tokens). An unknown token's id is 0 in the array."""
    input_ids: list[int] = []
    prev_index, prev_rows = [], []
    for chunk in chunks:
        request, start, num_new = chunk.request, chunk.start, chunk.num_new_tokens
        prompt, outputs = request.prompt_token_ids, request.output_token_ids
        num_drafts = len(chunk.draft_token_ids)  # drafts follow the known last token
        end = min(start + num_new - num_drafts, len(prompt) + len(outputs))
        if num_new == 1 and not num_drafts:  # a decode: of a known token, or of the one in flight
            if end > start:
                input_ids.append(prompt[start] if start < len(prompt) else outputs[start - len(prompt)])
            else:
                prev_index.append(len(input_ids))
                prev_rows.append(prev_sample_rows[request.request_id])
                input_ids.append(0)
            continue
        input_ids += _known_tokens(prompt, outputs, start, end)
        input_ids += chunk.draft_token_ids
        num_unknown = start + num_new - num_drafts - end
        if num_unknown:
            # Only one step is ever in flight, so only a chunk's last token can be unknown.
            assert num_unknown == 1 and not num_drafts and request.request_id in prev_sample_rows, \
                f"{request.request_id}: {num_unknown} unknown input tokens, in flight: {request.request_id in prev_sample_rows}"
            prev_index.append(len(input_ids))
            prev_rows.append(prev_sample_rows[request.request_id])
            input_ids.append(0)
    assert len(input_ids) == num_tokens, (len(input_ids), num_tokens)
    return np.array(input_ids, dtype=np.int64), prev_index, prev_rows


def _known_tokens(prompt: list[int], outputs: list[int], start: int, end: int) -> list[int]:
    """Tokens ``start:end`` of ``prompt + outputs`` that are known, without joining the two lists
    (a decode reads one output token, not the whole sequence)."""
    num_prompt = len(prompt)
    if start >= num_prompt:
        return outputs[start - num_prompt:end - num_prompt]
    if end <= num_prompt:
        return prompt[start:end]
    return prompt[start:] + outputs[:end - num_prompt]
