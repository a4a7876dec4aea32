"""Where the kernel tests run: on a CUDA GPU, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); skipped elsewhere. ``pytestmark = KERNEL_MARKS`` in a test module.

Triton 3.6's interpreter fails with the CPU set-up's numpy 2.4 ("only 0-dimensional arrays can be
converted to Python scalars", at a loop whose bounds the kernel computes); with numpy 2.2 it runs
(e.g. ``pip install --target DIR triton==3.6.0 numpy==2.2.6`` and DIR first on PYTHONPATH)."""
from __future__ import annotations

import os

import pytest
import torch

IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA and not IS_INTERPRETED else "cpu"

KERNEL_MARKS = [pytest.mark.gpu,
                pytest.mark.skipif(not HAS_CUDA and not IS_INTERPRETED,
                                   reason="needs a CUDA GPU (or TRITON_INTERPRET=1 on the CPU)")]
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def random_block_tables(blocks_per_seq, num_blocks: int, max_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """[num_seqs, max_blocks] int64 block tables on the CPU: sequence i's first ``blocks_per_seq[i]``
    entries are blocks of one random permutation (no block in two sequences), the other entries
    random valid block ids, whose keys no query may see."""
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(blocks_per_seq), max_blocks), generator=gen)
    first = 0
    for row, count in enumerate(blocks_per_seq):
        tables[row, :count] = order[first:first + count]
        first += count
    return tables
