"""The batched sampler: turns one step's logits into one token per row.

It lives on the rank that samples (the last pipeline stage's first TP rank) and keeps, per request,
its sampling parameters, its number of outputs (for ``min_tokens``), its token history when a
penalty needs it and, for a seeded request, its own ``torch.Generator``. A step's tokens stay on
the device (``sample_on_device``), so the host never waits for them, except that the history of a
request with a penalty or bad words needs its last token, and a structured-output request's matcher
must consume its last token before the next mask: a step with such a request first waits for the
tokens of the steps before it (their copy to the host, which follows their sampling; the forward
launched since keeps running). Steps without such a request never wait. Stop strings, stop token
ids, ``ignore_eos`` and ``max_tokens`` are decided on rank 0 after detokenization, not here.

One step, all batched over rows:

1. logprobs (when some row asks) from ``log_softmax`` of the raw logits, as vLLM reports them;
2. ``allowed_token_ids``, ``bad_words`` and ``logit_bias`` (``token_constraints``);
   repetition penalty over prompt + output tokens, presence and frequency penalties over output tokens;
3. ``min_tokens``: eos ids and the request's stop token ids get ``-inf`` until it has enough outputs
   (not for structured outputs, where the grammar alone says where the output may end);
   structured outputs: every token the request's grammar does not allow next gets ``-inf``;
4. greedy rows take the argmax; the others divide by the temperature, filter by top-k, top-p and
   min-p (one sort), and sample by the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``.

The logits come in the model's dtype and are widened to float32 for these steps, ``ROWS_PER_SLICE``
rows (whole requests) at a time, so their float32 copies stay within a slice whatever the batch;
a step whose every row is greedy with none of 1-3 to apply takes the argmax of the logits as they
are (the same tokens: widening keeps every value), sparing even that (1.3 GB moved at 1712 rows).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from meshlm.executor.async_output import AsyncStepResult, SampledTokens
from meshlm.executor.grammar import GrammarCompiler, advance, apply_bitmask
from meshlm.executor.rejection_sampler import verify_drafts
from meshlm.executor.sampling_ops import (apply_penalties, apply_top_k_top_p_min_p, count_tokens,
                                          exponential_race, mask_banned_tokens, to_device as _to_device)
from meshlm.executor.token_constraints import apply_token_constraints
from meshlm.protocol import StepResult
from meshlm.sampling_params import SamplingParams

__all__ = ["Sampler", "count_tokens", "apply_penalties", "mask_banned_tokens",
           "apply_top_k_top_p_min_p", "exponential_race"]

# Rows sampled together at most: a step's float32 copies of the logits (the widened logits, their
# logprobs, penalties, the sort of top-k / top-p, probabilities, noise) take a slice of rows at a
# time, so their memory is bounded whatever the batch (executor/memory.py reserves it).
ROWS_PER_SLICE = 256
_SEED_MODULUS = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)

# Columns of the per-step parameter matrix, built on the host and copied to the device at once.
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY = range(7)
_NUM_PARAM_COLUMNS = 7


@dataclass(slots=True)
class _RequestState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # kept only when needs_history
    generator: torch.Generator | None  # only for a seeded request
    needs_history: bool  # a penalty, a bad word or a grammar matcher reads the outputs
    matcher: object | None = None  # the llguidance matcher of a structured-output request
    num_output_tokens: int = 0
    param_row: tuple[float, ...] = ()  # the request's row of the step's parameter matrix (_row_params)
    # Greedy with nothing else to apply (no logprobs, penalties, constraints or grammar): its token
    # is the argmax of its raw logits once min_tokens is reached.
    is_plain_greedy: bool = False


class Sampler:
    """Per-request state plus the batched sampling step (see the module docstring)."""

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int],
                 device: torch.device | str = "cpu", seed: int = 0,
                 grammars: GrammarCompiler | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        bad = [t for t in self.eos_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"eos_token_ids={self.eos_token_ids}: {bad} outside "
                             f"[0, vocab_size={vocab_size})")
        self.device = torch.device(device)
        self._generator = _make_generator(seed, self.device)  # noise for rows without a seed
        self._requests: dict[str, _RequestState] = {}
        self._grammars = grammars  # None: structured outputs are refused
        # Steps whose tokens are not in the histories yet: (their penalised or constrained rows'
        # states, the rows, the step's tokens on their way to the host: waiting for them waits for
        # that step's sampling only, not for the forward launched after it).
        self._unrecorded: list[tuple[list[_RequestState], list[int], AsyncStepResult]] = []

    # ----------------------------------------------------------------------- request state

    def add_request(self, request_id: str, params: SamplingParams,
                    prompt_token_ids: Sequence[int]) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already in the sampler")
        generator = None if params.seed is None else _make_generator(params.seed, self.device)
        matcher = None
        if params.structured_outputs is not None:
            if self._grammars is None:
                raise ValueError(f"request {request_id!r} asks for structured outputs, and this sampler "
                                 "has no tokenizer to compile grammars with")
            matcher = self._grammars.matcher(params.structured_outputs)
        top_k = self.vocab_size if params.top_k is None else min(params.top_k, self.vocab_size)
        param_row = (params.temperature, top_k, params.top_p, params.min_p, params.repetition_penalty,
                     params.presence_penalty, params.frequency_penalty)
        is_plain_greedy = (params.temperature == 0.0 and params.logprobs is None and not params.needs_output_history
                           and params.allowed_token_ids is None and not params.logit_bias and matcher is None)
        self._requests[request_id] = _RequestState(params, list(prompt_token_ids), [], generator,
                                                   params.needs_output_history or matcher is not None, matcher,
                                                   param_row=tuple(float(v) for v in param_row),
                                                   is_plain_greedy=is_plain_greedy)

    def remove_request(self, request_id: str) -> None:
        """Forget a request; a no-op for an unknown id (an aborted request may never have arrived)."""
        self._requests.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def output_token_ids(self, request_id: str) -> list[int]:
        """The tokens sampled for a request with a penalty so far (a copy; waits for them). Other
        requests keep no history: their list is empty."""
        self._record_history()
        return list(self._get_state(request_id).output_token_ids)

    def _record_history(self) -> None:
        """Append the unrecorded steps' tokens to the penalised requests' histories (waits for them)."""
        for states, rows, pending in self._unrecorded:
            values = pending.get_result().token_ids.tolist()
            for state, row in zip(states, rows):
                state.output_token_ids.append(values[row])
                if state.matcher is not None:
                    advance(state.matcher, values[row])
        self._unrecorded.clear()

    def _get_state(self, request_id: str) -> _RequestState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"request {request_id!r} was never added to the sampler "
                           f"(it holds {len(self._requests)} requests)") from None

    # ----------------------------------------------------------------------- the step

    def sample(self, logits: torch.Tensor, request_ids: Sequence[str]) -> StepResult:
        """``sample_on_device``, then wait for the tokens on the host."""
        return AsyncStepResult(self.sample_on_device(logits, request_ids)).get_result()

    def sample_on_device(self, logits: torch.Tensor, request_ids: Sequence[str],
                         num_drafts: np.ndarray | None = None,
                         draft_ids: torch.Tensor | None = None) -> SampledTokens:
        """Sample one token per row; row ``i`` of ``logits`` [num_rows, vocab_size] belongs to
        ``request_ids[i]``. Counts each row's output; the tokens stay on the device.

        A verify step (speculative decoding) passes ``num_drafts`` [num_requests]: request ``i``
        then has ``1 + num_drafts[i]`` consecutive logits rows, and ``draft_ids`` [num_rows] the
        draft each row scores (rejection_sampler.verify_drafts). Requests with drafts use no
        penalties, bad words, logprobs or pending min_tokens (the scheduler drafts for no other).
        """
        counts = np.ones(len(request_ids), np.int64) if num_drafts is None else 1 + num_drafts.astype(np.int64)
        num_rows = int(counts.sum())
        if logits.dim() != 2 or logits.shape != (num_rows, self.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} != (num_rows={num_rows}, "
                             f"vocab_size={self.vocab_size}) for {len(request_ids)} requests")
        states = [self._get_state(rid) for rid in request_ids]
        if num_drafts is None and all(s.is_plain_greedy and s.num_output_tokens >= s.params.min_tokens for s in states):
            return self._argmax_of_plain_greedy_rows(logits, states)  # every row greedy, nothing else to apply
        if any(state.needs_history for state in states):
            self._record_history()  # the only wait for earlier steps: penalties and matchers read their tokens
        wants_logprobs = any(s.params.logprobs is not None for s in states)
        k_max = max(s.params.logprobs or 0 for s in states)
        if num_drafts is not None:  # slices of whole requests, every slice as wide as the step
            widths = (int(num_drafts.max()) if len(num_drafts) else 0, wants_logprobs, k_max)
            pieces = [self._sample_verify_rows(logits[rows], states[requests], counts[requests], draft_ids[rows],
                                               *widths)
                      for requests, rows in _request_slices(counts)]
            return pieces[0] if len(pieces) == 1 else _concatenate(pieces)
        pieces = [self._sample_rows(logits[begin:begin + ROWS_PER_SLICE], states[begin:begin + ROWS_PER_SLICE],
                                    wants_logprobs, k_max)
                  for begin in range(0, num_rows, ROWS_PER_SLICE)]
        return pieces[0] if len(pieces) == 1 else _concatenate(pieces)

    def _sample_rows(self, logits: torch.Tensor, states: list[_RequestState], wants_logprobs: bool,
                     k_max: int) -> SampledTokens:
        """One token for each of ``states``' rows (one row a request, at most ROWS_PER_SLICE):
        the float32 copies of the steps above stay within the slice."""
        host_params = _row_params(states)  # [num_rows, 7] float64 on the host
        row_params = _to_device(host_params, self.device).float()
        logits = logits.to(self.device, torch.float32)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = self._constrained(logits, states, states, host_params, row_params)
        token_ids = self._choose_tokens(logits, states, host_params, row_params)
        self._count_outputs(states, None)
        self._defer_history(states, token_ids)
        return _device_output(token_ids, raw_logprobs, k_max)

    def _sample_verify_rows(self, logits: torch.Tensor, states: list[_RequestState], counts: np.ndarray,
                            draft_ids: torch.Tensor, max_drafts: int, wants_logprobs: bool,
                            k_max: int) -> SampledTokens:
        """A verify step's slice: request ``i`` has ``counts[i]`` consecutive rows, its drafts then
        one more; ``token_ids`` is ``1 + max_drafts`` wide (the step's widest)."""
        row_states = [s for s, c in zip(states, counts.tolist()) for _ in range(c)]
        host_params = _row_params(row_states)
        row_params = _to_device(host_params, self.device).float()
        logits = logits.to(self.device, torch.float32)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = self._constrained(logits, states, row_states, host_params, row_params)
        token_ids, num_tokens, last_rows = self._verify(logits, row_states, host_params, row_params,
                                                        counts - 1, draft_ids, max_drafts)
        self._count_outputs(states, counts - 1)
        self._defer_history(states, token_ids[:, 0])  # rows with history draft nothing
        last_tokens = token_ids.gather(1, (num_tokens - 1)[:, None])[:, 0]  # [num_requests]
        out = _device_output(last_tokens, None if raw_logprobs is None else raw_logprobs[last_rows], k_max)
        return SampledTokens(token_ids, out.logprobs, out.top_token_ids, out.top_logprobs,
                             num_tokens=num_tokens)

    def _defer_history(self, states: list[_RequestState], first_tokens: torch.Tensor) -> None:
        """Queue the sampled tokens of the rows that keep a history; copied behind the step and
        recorded when a later step needs them."""
        history_rows = [row for row, state in enumerate(states) if state.needs_history]
        if history_rows:
            pending = AsyncStepResult(SampledTokens(first_tokens, None, None, None))
            self._unrecorded.append(([states[row] for row in history_rows], history_rows, pending))

    def _constrained(self, logits: torch.Tensor, states: list[_RequestState], row_states: list[_RequestState],
                     host_params: np.ndarray, row_params: torch.Tensor) -> torch.Tensor:
        """The float32 logits after each row's allowed and banned tokens, logit bias, penalties,
        min_tokens and grammar (the rows of ``row_states``; ``states`` one per request)."""
        if any(s.params.allowed_token_ids is not None or s.params.logit_bias or s.params.bad_words_token_ids
               for s in states):
            logits = apply_token_constraints(logits, [s.params for s in row_states],
                                             [s.output_token_ids for s in row_states])
        logits = self._apply_penalties(logits, row_states, host_params, row_params)
        logits = self._apply_min_tokens(logits, row_states)
        return self._apply_grammars(logits, row_states)  # grammar rows carry no drafts: one row each

    def _argmax_of_plain_greedy_rows(self, logits: torch.Tensor, states: list[_RequestState]) -> SampledTokens:
        """Every row takes its argmax: in the logits' own dtype (a 16-bit value widens to float32
        exactly, so the argmax is the same), without a float32 copy of them."""
        self._count_outputs(states, None)
        return SampledTokens(logits.to(self.device).argmax(dim=-1), None, None, None)

    def _count_outputs(self, states: list[_RequestState], num_drafts: np.ndarray | None) -> None:
        """One more output each; a request with drafts is past min_tokens (its only use), however
        many of them it accepts."""
        for i, state in enumerate(states):
            state.num_output_tokens += 1
            if num_drafts is not None and num_drafts[i]:
                state.num_output_tokens = max(state.num_output_tokens, state.params.min_tokens)

    def _verify(self, logits: torch.Tensor, row_states: list[_RequestState], host_params: np.ndarray,
                row_params: torch.Tensor, num_drafts: np.ndarray, draft_ids: torch.Tensor,
                max_drafts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """verify_drafts on the processed logits: the target distribution as this sampler samples it
        (temperature, top-k, top-p, min-p), one uniform and one noise row per logits row."""
        greedy_tokens = logits.argmax(dim=-1)  # [num_rows]
        is_greedy = host_params[:, _TEMPERATURE] == 0.0
        probs = self._probs(logits, host_params, row_params)
        uniforms = torch.empty(len(row_states), device=self.device)
        uniforms.uniform_(generator=self._generator)
        for row, state in enumerate(row_states):
            if state.generator is not None and not is_greedy[row]:
                uniforms[row:row + 1].uniform_(generator=state.generator)
        noise = self._exponential_noise(row_states, is_greedy)
        num_drafts = _to_device(np.ascontiguousarray(num_drafts, dtype=np.int64), self.device)
        return verify_drafts(probs, greedy_tokens, _to_device(is_greedy, self.device), draft_ids.to(self.device),
                             num_drafts, uniforms, noise, max_drafts)

    def _apply_penalties(self, logits: torch.Tensor, states: list[_RequestState],
                         host_params: np.ndarray, row_params: torch.Tensor) -> torch.Tensor:
        uses_repetition = host_params[:, _REPETITION] != 1.0
        uses_output = uses_repetition | (host_params[:, _PRESENCE] != 0) | (host_params[:, _FREQUENCY] != 0)
        if not uses_output.any():
            return logits
        # Rows that use no penalty contribute empty histories, which keeps the padded tensors short.
        prompts = [s.prompt_token_ids if use else [] for s, use in zip(states, uses_repetition)]
        outputs = [s.output_token_ids if use else [] for s, use in zip(states, uses_output)]
        prompt_counts = count_tokens(prompts, self.vocab_size, self.device)
        output_counts = count_tokens(outputs, self.vocab_size, self.device)
        return apply_penalties(logits, prompt_counts, output_counts, row_params[:, _REPETITION],
                               row_params[:, _PRESENCE], row_params[:, _FREQUENCY])

    def _apply_min_tokens(self, logits: torch.Tensor, states: list[_RequestState]) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for row, state in enumerate(states):
            if state.num_output_tokens < state.params.min_tokens and state.matcher is None:
                banned = set(self.eos_token_ids).union(state.params.stop_token_ids)
                banned = [t for t in banned if t < self.vocab_size]
                rows.extend([row] * len(banned))
                cols.extend(banned)
        if not rows:
            return logits
        return mask_banned_tokens(logits, _to_device(np.array(rows, dtype=np.int64), self.device),
                                  _to_device(np.array(cols, dtype=np.int64), self.device))

    def _apply_grammars(self, logits: torch.Tensor, states: list[_RequestState]) -> torch.Tensor:
        rows = [row for row, state in enumerate(states) if state.matcher is not None]
        if not rows:
            return logits
        bitmask = self._grammars.fill_bitmask([states[row].matcher for row in rows])
        return apply_bitmask(logits, _to_device(np.array(rows, dtype=np.int64), self.device),
                             _to_device(bitmask, self.device))

    def _choose_tokens(self, logits: torch.Tensor, states: list[_RequestState],
                       host_params: np.ndarray, row_params: torch.Tensor) -> torch.Tensor:
        greedy_tokens = logits.argmax(dim=-1)  # [num_rows]
        is_greedy = host_params[:, _TEMPERATURE] == 0.0
        if is_greedy.all():
            return greedy_tokens
        probs = self._probs(logits, host_params, row_params)
        noise = self._exponential_noise(states, is_greedy)
        sampled_tokens = exponential_race(probs, noise)
        return torch.where(_to_device(is_greedy, self.device), greedy_tokens, sampled_tokens)

    def _probs(self, logits: torch.Tensor, host_params: np.ndarray, row_params: torch.Tensor) -> torch.Tensor:
        """The distribution each sampled row draws from: temperature, then top-k, top-p and min-p
        (greedy rows get the softmax at temperature 1, which nothing reads). [num_rows, vocab_size]"""
        temperature = row_params[:, _TEMPERATURE]
        temperature = torch.where(temperature == 0.0, torch.ones_like(temperature), temperature)
        scaled = logits / temperature[:, None]
        if _any_filter(host_params, self.vocab_size):
            scaled = apply_top_k_top_p_min_p(scaled, row_params[:, _TOP_K], row_params[:, _TOP_P],
                                             row_params[:, _MIN_P])
        return torch.softmax(scaled, dim=-1)  # [num_rows, vocab_size]

    def _exponential_noise(self, states: list[_RequestState], is_greedy: np.ndarray) -> torch.Tensor:
        """q ~ Exp(1), [num_rows, vocab_size]. A seeded row draws from its own generator (one draw of
        vocab_size per sampled step), so its tokens depend on neither its row nor its neighbours."""
        noise = torch.empty(len(states), self.vocab_size, device=self.device)
        noise.exponential_(generator=self._generator)
        for row, state in enumerate(states):
            if state.generator is not None and not is_greedy[row]:
                noise[row].exponential_(generator=state.generator)
        return noise


def _make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % _SEED_MODULUS)
    return generator


def _row_params(states: list[_RequestState]) -> np.ndarray:
    """The rows' numeric parameters as one [num_rows, 7] float64 host array (each state's row,
    top-k bounded by the vocabulary, is computed when its request is added)."""
    return np.array([state.param_row for state in states], dtype=np.float64).reshape(len(states), _NUM_PARAM_COLUMNS)


def _any_filter(host_params: np.ndarray, vocab_size: int) -> bool:
    """Whether some non-greedy row uses top-k, top-p or min-p (else the sort is skipped)."""
    sampled = host_params[:, _TEMPERATURE] != 0.0
    uses = ((host_params[:, _TOP_K] < vocab_size) | (host_params[:, _TOP_P] < 1.0)
            | (host_params[:, _MIN_P] > 0.0))
    return bool((uses & sampled).any())


def _device_output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, k_max: int) -> SampledTokens:
    if raw_logprobs is None:
        return SampledTokens(token_ids, None, None, None)
    sampled = raw_logprobs.gather(1, token_ids[:, None])[:, 0]  # [num_rows]
    if k_max == 0:
        return SampledTokens(token_ids, sampled, None, None)
    top_logprobs, top_ids = raw_logprobs.topk(k_max, dim=-1)  # [num_rows, k_max], sorted descending
    return SampledTokens(token_ids, sampled, top_ids, top_logprobs)


def _request_slices(counts: np.ndarray) -> list[tuple[slice, slice]]:
    """(requests, their logits rows) of each slice: whole requests, at most ROWS_PER_SLICE rows
    unless one request has more."""
    bounds, rows = [0], 0
    for i, count in enumerate(counts.tolist()):
        if rows and rows + count > ROWS_PER_SLICE:
            bounds.append(i)
            rows = 0
        rows += count
    bounds.append(len(counts))
    offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
    return [(slice(a, b), slice(offsets[a], offsets[b])) for a, b in zip(bounds, bounds[1:])]


def _concatenate(pieces: list[SampledTokens]) -> SampledTokens:
    """The slices' outputs as one step's, in row order (every slice has the same fields)."""
    def cat(name: str) -> torch.Tensor | None:
        tensors = [getattr(piece, name) for piece in pieces]
        return None if tensors[0] is None else torch.cat(tensors)
    return SampledTokens(cat("token_ids"), cat("logprobs"), cat("top_token_ids"), cat("top_logprobs"),
                         num_tokens=cat("num_tokens"))
