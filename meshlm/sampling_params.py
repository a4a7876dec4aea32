"""Per-request sampling parameters, with vLLM's names and defaults.

Validated on construction: a bad value raises ``ValueError`` naming the field, the value and the
allowed range. ``None`` means "off" or "automatic" as each field says; there are no ``-1`` sentinels.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshlm.structured_outputs import StructuredOutputsParams

__all__ = ["SamplingParams", "BeamSearchParams", "MAX_LOGPROBS", "MAX_BEAM_WIDTH"]

MAX_LOGPROBS = 20  # the most top logprobs one request may ask for (OpenAI's limit)
_MAX_SEED = 2**64  # torch.Generator.manual_seed takes seeds modulo 2**64
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a logit_bias value: [-100, 100]
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step ranks 2 x beam_width candidates per beam
_EARLY_STOPPING = (True, False, "never")


@dataclass(slots=True)
class SamplingParams:
    """How one request samples and when it stops.

    ``temperature=0`` means greedy. ``top_k=None`` turns top-k off. ``max_tokens=None`` generates
    up to the context length. ``logprobs=None`` returns no logprobs; ``logprobs=k`` returns the
    sampled token's logprob and the ``k`` most likely tokens' (``k=0``: the sampled one only).
    ``seed`` makes the request's tokens independent of what else is in the batch.
    ``prompt_logprobs=k`` returns, for every prompt token after the first, its logprob given the
    tokens before it and the ``k`` most likely tokens' there (the first token's entry is None).

    ``logit_bias`` ({token id: bias in [-100, 100]}, as OpenAI) is added to the logits;
    ``allowed_token_ids`` restricts sampling to those ids; ``bad_words`` are never generated: their
    token ids (``bad_words_token_ids``, filled in by ``with_bad_words_tokenized`` where a tokenizer
    is, or given directly without one) are banned when the tokens before the word's last match.
    ``structured_outputs`` (a ``StructuredOutputsParams`` or its dict) constrains the output to a
    JSON schema, regex, choice or grammar; eos is then allowed only where the grammar is complete.

    ``use_beam_search`` (vLLM's extra) runs beam search of width ``best_of`` (default ``n``) and
    returns the ``n`` best finished beams, scored ``cum_logprob / num_tokens ** length_penalty``;
    ``early_stopping`` is transformers': True, False or "never" (see engine/beam_search.py).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | Sequence[str] | None = None  # normalised to a tuple of non-empty strings
    stop_token_ids: Sequence[int] | None = None  # normalised to a tuple of ints
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: Mapping[int, float] | None = None  # normalised to a dict {int: float}; keys may be "123"
    allowed_token_ids: Sequence[int] | None = None  # None: every token; normalised to a tuple of ints
    bad_words: str | Sequence[str] | None = None  # normalised to a tuple of non-empty strings
    bad_words_token_ids: Sequence[Sequence[int]] | None = None  # normalised to a tuple of tuples
    structured_outputs: StructuredOutputsParams | Mapping | None = None  # a dict becomes the dataclass
    use_beam_search: bool = False
    best_of: int | None = None  # None: n; beam search's width
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_token_ids("stop_token_ids", self.stop_token_ids)
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _normalise_token_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids=[] would allow no token: give at least one id, or None")
        self.bad_words = _normalise_stop(self.bad_words, "bad_words")
        self.bad_words_token_ids = tuple(
            _normalise_token_ids("bad_words_token_ids", ids) for ids in self.bad_words_token_ids or ())
        if any(not ids for ids in self.bad_words_token_ids):
            raise ValueError(f"bad_words_token_ids={self.bad_words_token_ids!r}: a word has no token ids")
        self._check_structured_outputs()
        self._check_counts()
        self._check_filters()
        self._check_penalties()
        self._check_beam_search()
        self._coerce_numbers()

    def _check_counts(self) -> None:
        _check_int("n", self.n, lower=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lower=1, none_hint="None (up to the context length)")
        _check_int("min_tokens", self.min_tokens, lower=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lower=0, upper=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lower=0, upper=MAX_LOGPROBS)
        if self.seed is not None and (not _is_int(self.seed) or not -_MAX_SEED < self.seed < _MAX_SEED):
            raise ValueError(f"seed={self.seed!r} must be an integer with |seed| < 2**64, or None")

    def _check_structured_outputs(self) -> None:
        if self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams):
            return
        if not isinstance(self.structured_outputs, Mapping):
            raise ValueError(f"structured_outputs={self.structured_outputs!r} must be a StructuredOutputsParams "
                             "or a dict of its fields")
        self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)

    def _check_filters(self) -> None:
        _check_real("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, lower=1, none_hint="None (top-k off)")
        _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")

    def _check_penalties(self) -> None:
        _check_real("repetition_penalty", self.repetition_penalty)
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 means off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_real(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}={value} must be in [-2, 2]")

    def _check_beam_search(self) -> None:
        if self.best_of is not None:
            _check_int("best_of", self.best_of, lower=1)
            if not self.use_beam_search and self.best_of != self.n:
                raise ValueError(f"best_of={self.best_of}: without use_beam_search only best_of == n={self.n} "
                                 "is supported")
        _check_real("length_penalty", self.length_penalty)
        if self.early_stopping not in _EARLY_STOPPING or isinstance(self.early_stopping, int) and \
                not isinstance(self.early_stopping, bool):
            raise ValueError(f"early_stopping={self.early_stopping!r} must be True, False or 'never'")
        if not self.use_beam_search:
            return
        width = self.beam_width
        if width > MAX_BEAM_WIDTH or self.n > width:
            raise ValueError(f"beam search: best_of={width} (the beam width) must be in [n={self.n}, "
                             f"{MAX_BEAM_WIDTH}]")

    @property
    def beam_width(self) -> int:
        """Beam search's width: ``best_of``, else ``n``."""
        return self.n if self.best_of is None else self.best_of

    def _coerce_numbers(self) -> None:
        # numpy scalars pass validation; store plain Python numbers so the params pickle small.
        for name in ("n", "min_tokens", "max_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "best_of"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, int(value))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "length_penalty"):
            setattr(self, name, float(getattr(self, name)))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when any of the repetition, presence or frequency penalties is on."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def needs_output_history(self) -> bool:
        """True when sampling reads the request's earlier output tokens (penalties, bad words)."""
        return self.uses_penalties or bool(self.bad_words_token_ids)

    def with_bad_words_tokenized(self, tokenizer) -> SamplingParams:
        """A copy whose ``bad_words_token_ids`` holds every bad word's token ids, tokenized alone and
        after a space (a word inside a text usually follows one), and whose ``bad_words`` is empty
        (so a second call does nothing); ``self`` when there are no bad words. ``tokenizer=None``
        with bad words is an error."""
        if not self.bad_words:
            return self
        if tokenizer is None:
            raise ValueError(f"bad_words={list(self.bad_words)!r} need a tokenizer, and it is off "
                             "(skip_tokenizer_init): give bad_words_token_ids instead")
        ids = list(self.bad_words_token_ids)
        for word in self.bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                word_ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if word_ids and word_ids not in ids:
                    ids.append(word_ids)
        return self.replace(bad_words_token_ids=ids, bad_words=None)

    def replace(self, **changes: object) -> SamplingParams:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (tuples become lists, logit_bias keys strings, as JSON
        keys must be); ``from_dict`` reverses it."""
        out = {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
               for f in dataclasses.fields(self)}
        out["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        if self.structured_outputs is not None:
            out["structured_outputs"] = self.structured_outputs.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict) -> SamplingParams:
        """Validated parameters from ``to_dict``'s output; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown sampling parameters {unknown}; known: {sorted(names)}")
        return cls(**values)

    def for_sample(self, index: int) -> SamplingParams:
        """The parameters of the ``index``-th of the ``n`` samples: ``n=1`` and, when a seed is set,
        ``seed + index``, so the ``n`` samples differ from one another yet each is reproducible."""
        if not 0 <= index < self.n:
            raise ValueError(f"sample index={index} must be in [0, n={self.n})")
        seed = None if self.seed is None else (self.seed + index) % _MAX_SEED
        return self.replace(n=1, seed=seed, best_of=None)


@dataclass(slots=True)
class BeamSearchParams:
    """``LLM.beam_search``'s parameters, as vLLM's. ``early_stopping`` (an extra) is transformers':
    see engine/beam_search.py. As in vLLM, beams are scored by the model's log-probabilities, which
    ``temperature`` does not change."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        self.to_sampling_params()  # validates

    def to_sampling_params(self) -> SamplingParams:
        """The same search as ``SamplingParams``: all ``beam_width`` beams returned, best first."""
        return SamplingParams(n=self.beam_width, best_of=self.beam_width, use_beam_search=True,
                              temperature=self.temperature, max_tokens=self.max_tokens,
                              ignore_eos=self.ignore_eos, length_penalty=self.length_penalty,
                              early_stopping=self.early_stopping,
                              include_stop_str_in_output=self.include_stop_str_in_output)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: object, lower: int, upper: int | None = None,
               none_hint: str | None = None) -> None:
    too_high = upper is not None and _is_int(value) and value > upper
    if not _is_int(value) or value < lower or too_high:
        allowed = f">= {lower}" if upper is None else f"in [{lower}, {upper}]"
        hint = f", or {none_hint}" if none_hint else ""
        raise ValueError(f"{name}={value!r} must be an integer {allowed}{hint}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{name}={value!r} must be a real number")


def _normalise_stop(stop: str | Sequence[str] | None, name: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{name}={stop!r}: every one must be a non-empty str, got {item!r}")
    return items


def _normalise_token_ids(name: str, ids: Sequence[int] | None) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"{name}={ids!r} must be a list of non-negative token ids")
    for token_id in ids:
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"{name}={ids!r}: {token_id!r} is not a token id (an integer >= 0)")
    return tuple(int(t) for t in ids)


def _normalise_logit_bias(bias: Mapping[int, float] | None) -> dict[int, float]:
    """``{token id: bias}`` with int keys (JSON's and OpenAI's string keys such as ``"50256"`` too)."""
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias={bias!r} must be a map from token id to bias")
    out = {}
    for key, value in bias.items():
        token_id = int(key) if isinstance(key, str) and key.isdecimal() else key
        if not _is_int(token_id) or token_id < 0:
            raise ValueError(f"logit_bias: key {key!r} is not a token id (an integer >= 0)")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not \
                -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: the bias {value!r} of token {key!r} must be a number in "
                             f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        out[int(token_id)] = float(value)
    return out
