"""One logger, ``meshlm``, prefixed with the rank and its coordinates; INFO on rank 0 only."""
from __future__ import annotations

import logging
import sys

from meshlm.launcher import env

_PREFIX = {"text": "rank 0"}


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank_prefix = _PREFIX["text"]
        return True


def setup_logging(rank: int = 0, description: str | None = None) -> logging.Logger:
    """Configure the ``meshlm`` logger for this rank (safe to call again when the rank is known)."""
    _PREFIX["text"] = description or f"rank {rank}"
    logger = logging.getLogger("meshlm")
    level = getattr(logging, (env.get("MESHLM_LOG_LEVEL") or "INFO").upper(), logging.INFO)
    if rank != 0 and env.get("MESHLM_LOG_ALL_RANKS") != "1":
        level = max(level, logging.WARNING)
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[meshlm %(rank_prefix)s] %(levelname)s %(message)s"))
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.propagate = False
    return logger


def set_rank_description(text: str) -> None:
    _PREFIX["text"] = text
