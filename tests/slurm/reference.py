"""The single-rank reference of the Slurm and multi-node tests, and how a job's text is checked.

The tiny random Llama of tests/model_factory.py has a word-level tokenizer (``w3 w4 ...``), so its
text maps one-to-one onto token ids: the text that ``meshlm generate`` prints can be checked token
by token against the ids of the single-rank run.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT = "w5 w17 w42 w99 w7 w250 w31"
VOCAB_SIZE = 320  # of tests/model_factory.py's models: words w3 ... w319 after 3 special tokens
MAX_TOKENS = 8
GENERATE_ARGS = f"--max-tokens {MAX_TOKENS} --num-kv-blocks 64 --max-model-len 256 --no-chat"

# "[meshlm rank 3 tp 1/2 pp 1/2] INFO model ..." : the coordinates every rank logs with
# MESHLM_LOG_ALL_RANKS=1.
_RANK_LOG = re.compile(r"^\[meshlm (rank \d+(?: tp \d+/\d+)?(?: pp \d+/\d+)?)\] INFO model ", re.M)


@dataclass(frozen=True, slots=True)
class Reference:
    token_ids: list[int]
    text: str


def single_rank_reference(model_dir: Path, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> Reference:
    """Greedy output of one rank in this process (no MPI world), as ``meshlm generate`` asks for it."""
    from meshlm import LLM, SamplingParams
    llm = LLM(str(model_dir), device="cpu", num_kv_blocks=64, max_model_len=256)
    try:
        (out,) = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
    finally:
        llm.shutdown()
    return Reference(list(out.outputs[0].token_ids), out.outputs[0].text)


def long_prompt(num_words: int, seed: int = 7) -> str:
    """``num_words`` ordinary words of the test tokenizer, one token each."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(3, VOCAB_SIZE)}" for _ in range(num_words))


# Long enough that the activations crossing a link between hosts outweigh the launchers' own
# traffic (hydra's and PMI's start-up exchange is ~20-30 KB).
LONG_PROMPT = long_prompt(200)


def text_token_ids(model_dir: Path, text: str) -> list[int]:
    """The ids of the words in ``text`` (the tokenizer itself, not meshlm)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def expected_rank_coordinates(tp: int, pp: int) -> set[str]:
    """Log prefixes of a tp x pp world, tp fastest: rank r is tp r % tp, pp r // tp."""
    coords = set()
    for rank in range(tp * pp):
        parts = [f"rank {rank}"]
        if tp > 1:
            parts.append(f"tp {rank % tp}/{tp}")
        if pp > 1:
            parts.append(f"pp {rank // tp}/{pp}")
        coords.add(" ".join(parts))
    return coords


def logged_rank_coordinates(log: str) -> list[str]:
    return _RANK_LOG.findall(log)


def assert_same_tokens(model_dir: Path, ref: Reference, text: str, where: str) -> None:
    """The printed text is the reference's text, word for word, hence token for token."""
    assert len(ref.token_ids) >= 4, f"the reference stopped after {ref.token_ids}: too short to compare"
    expected_ids = [t for t in ref.token_ids if t > 2]  # ids 0-2 are special: not printed
    assert text_token_ids(model_dir, text) == expected_ids, f"{where}: printed {text!r}, reference {ref.text!r}"
    assert text == ref.text.strip(), where
