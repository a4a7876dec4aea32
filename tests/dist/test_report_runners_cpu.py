"""run_layout.py ``--report-runners`` on the CPU: every rank records one entry per ModelRunner,
with its device, its communicators and (at shutdown) its graph replays, and rank 0 writes them all.
The multi-GPU tests read the same entries to check cuda:<local rank>, NCCL and CUDA graphs."""
from __future__ import annotations

import pytest

from tests.dist.harness import LayoutRuns

pytestmark = pytest.mark.timeout(300)


def test_every_rank_reports_its_runners(tmp_path, tiny_models, tiny_prompts):
    jobs = [{"name": name, "model": str(tiny_models[name]), "prompts": tiny_prompts[:2], "max_tokens": 2}
            for name in ("llama", "qwen3")]
    runs = LayoutRuns(tmp_path, jobs, script_args=("--report-runners",))
    data = runs.launch(2, 1)
    assert len(data["runners"]) == 2
    for rank, records in enumerate(data["runners"]):
        assert records == [{"device": "cpu", "tp_comm": "MPIComm", "pp_comm": "SingleRankComm", "graph_replays": 0}] * 2, (
            rank, records)
    assert set(data["results"]) == {"llama", "qwen3"}
    pp = runs.launch(1, 2)["runners"]
    assert [r["tp_comm"] + "/" + r["pp_comm"] for records in pp for r in records] == ["SingleRankComm/MPIComm"] * 4
