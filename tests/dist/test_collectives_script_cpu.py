"""The multi-GPU collectives script (tests/gpu_multi/run_collectives.py) on the CPU, MPI on both
sides: its cases pair up, every named collective runs on every rank of every layout, the
sampler alone gets the gathered logits, and the ranks exit 0. What the GPU run then adds is NCCL
on one side."""
from __future__ import annotations

import json

import pytest

from tests.dist.harness import REPO_ROOT, assert_world, mpiexec
from tests.gpu_multi.agreement import collective_failures

pytestmark = pytest.mark.timeout(200)

RUN_COLLECTIVES = REPO_ROOT / "tests" / "gpu_multi" / "run_collectives.py"
NAMES = {"all_reduce_tp", "combine_from_experts", "gather_logits_to_sampler", "all_gather_dim0",
         "broadcast_sampled_tokens", "broadcast_from_last", "pipeline_hand_off"}


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_collectives_script_pairs_its_cases(tmp_path, num_ranks):
    out = tmp_path / "out.json"
    result = mpiexec(num_ranks, ["--out", str(out), "--device", "cpu"], timeout_s=150, script=RUN_COLLECTIVES)
    assert result.returncode == 0, result.describe()
    assert_world(result, num_ranks)
    data = json.loads(out.read_text())
    assert [d["device"] for d in data["devices"]] == ["cpu"] * num_ranks
    checks = data["checks"]
    layouts = {"tp2-pp1", "tp1-pp2"} if num_ranks == 2 else {"tp4-pp1", "tp1-pp4", "tp2-pp2"}
    assert {c["layout"] for c in checks} == layouts
    for layout in layouts:
        names = {c["name"] for c in checks if c["layout"] == layout}
        tp_names, pp_names = NAMES - {"pipeline_hand_off"}, {"pipeline_hand_off"}
        expected = (tp_names if not layout.startswith("tp1-") else set()) | (pp_names if not layout.endswith("-pp1") else set())
        assert names == expected, (layout, names)
        assert {c["rank"] for c in checks if c["layout"] == layout} == set(range(num_ranks))
    gathered = [c["mpi_shape"] for c in checks if c["layout"] == f"tp{num_ranks}-pp1"
                and c["name"] == "gather_logits_to_sampler"]
    assert gathered == [[5, 40 * num_ranks]] + [None] * (num_ranks - 1)
    # MPI against itself: bit-equal, so a zero tolerance everywhere must hold.
    assert collective_failures(checks, {"float32": 0.0, "bfloat16": 0.0, "int64": 0.0}) == []
    # Every stage ends the hand-off holding hidden states [num_tokens, hidden]: stage 0 its input, the
    # others what they received.
    assert {tuple(c["mpi_shape"]) for c in checks if c["name"] == "pipeline_hand_off"} == {(6, 32)}
