"""Benchmark requests: synthetic (random prompts of normally distributed lengths) or from a JSONL file.

Synthetic lengths follow trtllm-bench's token-norm-dist: ``round(N(mean, stdev))``, clipped to >= 1.
Prompts are random token ids (exact input lengths) or, for servers that tokenize themselves, random
common English words, about one token each.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Short common words: one token each (with their leading space) in the usual BPE vocabularies.
_WORDS = ("the of and to in is it you that he was for on are as with his they at be this have "
          "from or one had by word but not what all were we when your can said there use an each "
          "which she do how their if will up other about out many then them these so some her "
          "would make like him into time has look two more write go see number no way could "
          "people my than first water been call who oil its now find long down day did get come "
          "made may part").split()


@dataclass(slots=True)
class BenchRequest:
    """One request to send: its prompt, how many tokens to generate, and its prompt length if known."""

    prompt: str | list[int]  # text, or token ids
    output_len: int
    input_len: int | None = None  # None: text whose token count only the tokenizer knows

    @property
    def approx_input_len(self) -> int:
        """Token ids: their count; text: its word count (one token per word, roughly)."""
        if self.input_len is not None:
            return self.input_len
        return max(1, len(str(self.prompt).split()))


def token_norm_lengths(rng: np.random.Generator, mean: int, stdev: float, count: int) -> np.ndarray:
    """``count`` lengths drawn from N(mean, stdev), rounded to integers and clipped to >= 1."""
    if mean < 1 or stdev < 0 or count < 0:
        raise ValueError(f"token lengths need mean >= 1, stdev >= 0 and count >= 0; got mean={mean}, "
                         f"stdev={stdev}, count={count}")
    if stdev == 0:
        return np.full(count, mean, dtype=np.int64)
    return np.maximum(np.rint(rng.normal(mean, stdev, count)), 1).astype(np.int64)


def random_text(rng: np.random.Generator, num_words: int) -> str:
    """``num_words`` random common words: about ``num_words`` tokens once the server tokenizes it."""
    return " ".join(rng.choice(_WORDS, size=num_words).tolist())


def synthetic_requests(num_prompts: int, input_len: int, output_len: int, input_stdev: float = 0.0,
                       output_stdev: float = 0.0, vocab_size: int | None = None,
                       seed: int = 0) -> list[BenchRequest]:
    """Random prompts with token-norm-dist lengths (fixed seed).

    With ``vocab_size`` the prompts are token ids drawn uniformly from [0, vocab_size); without it,
    random text of about the drawn number of tokens.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    rng = np.random.default_rng(seed)
    input_lens = token_norm_lengths(rng, input_len, input_stdev, num_prompts)
    output_lens = token_norm_lengths(rng, output_len, output_stdev, num_prompts)
    requests = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist()):
        if vocab_size is None:
            requests.append(BenchRequest(random_text(rng, n_in), n_out))
        else:
            requests.append(BenchRequest(rng.integers(0, vocab_size, n_in).tolist(), n_out, n_in))
    return requests


def warmup_requests(requests: list[BenchRequest], count: int, vocab_size: int | None,
                    seed: int) -> list[BenchRequest]:
    """``count`` requests shaped like the first ones of ``requests`` but with other random prompts,
    so that warming up leaves nothing in the prefix cache that the measured requests could reuse."""
    if count < 0:
        raise ValueError(f"warmup={count} must be >= 0")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        like = requests[i % len(requests)]
        n_in = like.approx_input_len
        if vocab_size is None:
            out.append(BenchRequest(random_text(rng, n_in), like.output_len))
        else:
            out.append(BenchRequest(rng.integers(0, vocab_size, n_in).tolist(), like.output_len, n_in))
    return out


def load_jsonl(path: str | Path, num_prompts: int | None = None) -> list[BenchRequest]:
    """Requests from a JSONL file, one JSON object a line; blank lines are skipped.

    Each line: ``{"prompt": "text" or [token ids], "output_len": N}`` or, OpenAI style,
    ``{"prompt": ..., "max_tokens": N}``. ``num_prompts`` takes the first that many (None: all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(path)!r}: no such file")
    requests = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if num_prompts is not None and len(requests) == num_prompts:
                break
            if line.strip():
                requests.append(_parse_line(line, f"{path} line {line_no}"))
    if not requests:
        raise ValueError(f"dataset {path}: no requests in the file")
    if num_prompts is not None and len(requests) < num_prompts:
        raise ValueError(f"dataset {path} holds {len(requests)} requests but --num-prompts is {num_prompts}")
    return requests


def _parse_line(line: str, where: str) -> BenchRequest:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object with \"prompt\" and \"output_len\" "
                         f"(or \"max_tokens\"), got {type(item).__name__}")
    prompt = item.get("prompt")
    if isinstance(prompt, str) and prompt:
        input_len = None
    elif (isinstance(prompt, list) and prompt
          and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        input_len = len(prompt)
    else:
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string or a non-empty list of "
                         f"token ids (ints >= 0); got {str(prompt)[:60]!r}")
    key = "output_len" if "output_len" in item else "max_tokens"
    output_len = item.get(key)
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ValueError(f"{where}: needs \"output_len\" (or \"max_tokens\") as an int >= 1; "
                         f"got {key}={output_len!r}")
    return BenchRequest(prompt, output_len, input_len)


DEFAULT_NUM_SYNTHETIC_PROMPTS = 1000


@dataclass(slots=True)
class Workload:
    """What to send: synthetic lengths or a JSONL dataset, and how many warm-up requests first."""

    num_prompts: int | None = None  # None: 1000 synthetic prompts, or every line of the dataset
    input_len: int = 1024
    output_len: int = 128
    input_stdev: float = 0.0
    output_stdev: float = 0.0
    dataset: str | None = None
    warmup: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ValueError(f"num_prompts={self.num_prompts} must be >= 1")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError(f"input_len={self.input_len} and output_len={self.output_len} must be >= 1")
        if self.input_stdev < 0 or self.output_stdev < 0:
            raise ValueError(f"input_stdev={self.input_stdev} and output_stdev={self.output_stdev} "
                             "must be >= 0")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if self.dataset is not None:
            load_jsonl(self.dataset, self.num_prompts)  # a bad file fails now, before any model loads

    def requests(self, vocab_size: int | None) -> list[BenchRequest]:
        """The measured requests; synthetic prompts are token ids when ``vocab_size`` is given."""
        if self.dataset is not None:
            return load_jsonl(self.dataset, self.num_prompts)
        return synthetic_requests(self.num_prompts or DEFAULT_NUM_SYNTHETIC_PROMPTS, self.input_len,
                                  self.output_len, self.input_stdev, self.output_stdev, vocab_size, self.seed)

    def warmup_requests(self, requests: list[BenchRequest], vocab_size: int | None) -> list[BenchRequest]:
        return warmup_requests(requests, self.warmup, vocab_size, self.seed + 1)

    def describe(self, num_prompts: int) -> dict:
        """The workload's part of a result's config; lengths are None when a dataset sets them."""
        synthetic = self.dataset is None
        return {"dataset": self.dataset, "num_prompts": num_prompts,
                "input_len": self.input_len if synthetic else None,
                "output_len": self.output_len if synthetic else None,
                "input_stdev": self.input_stdev if synthetic else None,
                "output_stdev": self.output_stdev if synthetic else None,
                "warmup": self.warmup, "seed": self.seed}
