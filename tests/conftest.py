"""Shared test set-up: the repository root on ``sys.path`` (helpers import as ``tests.model_factory``),
and one OpenMP thread per process unless OMP_NUM_THREADS says otherwise."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# Tests (and the MPI ranks they start) share a few cores; torch's OpenMP workers spin-wait when
# oversubscribed, which makes small CPU models several times slower than with one thread.
# Set before torch is imported, and inherited by subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
