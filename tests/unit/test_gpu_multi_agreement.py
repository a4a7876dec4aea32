"""The agreement rules of the multi-GPU tests (tests/gpu_multi/agreement.py), on made-up results."""
from __future__ import annotations

import math

from tests.gpu_multi.agreement import (collective_failures, first_token_failures, greedy_failures,
                                       runner_failures)

TOL = {"float32": 1e-5, "bfloat16": 0.0, "int64": 0.0}


def _check(**kw):
    base = {"layout": "tp2-pp1", "name": "all_reduce_tp", "rank": 1, "dtype": "float32",
            "nccl_shape": [3, 4], "mpi_shape": [3, 4], "max_abs_diff": 0.0}
    return {**base, **kw}


def test_collectives_within_tolerance_pass():
    assert collective_failures([_check(max_abs_diff=1e-6), _check(dtype="int64")], TOL) == []
    # A collective that returns None on this rank on both backends (the logits gather off the sampler)
    assert collective_failures([_check(nccl_shape=None, mpi_shape=None, max_abs_diff=None)], TOL) == []


def test_collective_differences_are_named():
    failures = collective_failures([_check(max_abs_diff=1e-3), _check(dtype="bfloat16", max_abs_diff=0.5),
                                    _check(max_abs_diff=math.nan)], TOL)
    assert len(failures) == 3
    assert failures[0].startswith("tp2-pp1 all_reduce_tp rank 1 float32: max |NCCL - MPI| = 0.001")


def test_collective_shape_mismatch_and_unknown_dtype_fail():
    assert "shape None, MPI [3, 4]" in collective_failures([_check(nccl_shape=None, max_abs_diff=None)], TOL)[0]
    assert "no tolerance for dtype float16" in collective_failures([_check(dtype="float16")], TOL)[0]


def _out(tokens, logprobs):
    return {"token_ids": tokens, "logprobs": logprobs}


REF = [_out([5, 6], [{"5": -0.1, "7": -2.0}, {"6": -0.3, "9": -1.5}])]


def test_greedy_equal_tokens_and_close_logprobs_pass():
    got = [_out([5, 6], [{"5": -0.1005, "7": -2.0}, {"6": -0.3, "8": -1.6}])]  # 8/9 differ at the cut-off only
    assert greedy_failures(REF, got, 1e-3, "tp2") == []


def test_greedy_different_tokens_or_far_logprobs_fail():
    assert "tokens [5, 9], reference [5, 6]" in greedy_failures(REF, [_out([5, 9], REF[0]["logprobs"])], 1e-3, "tp2")[0]
    far = [_out([5, 6], [{"5": -0.2, "7": -2.0}, {"6": -0.3}])]
    assert greedy_failures(REF, far, 1e-3, "tp2") == ["tp2 prompt 0 token 0: logprob of 5 is -0.2, reference -0.1"]
    assert greedy_failures(REF, [], 1e-3, "tp2") == ["tp2: 0 results, the reference has 1"]
    disjoint = [_out([5, 6], [{"11": -0.1}, {"6": -0.3}])]
    assert greedy_failures(REF, disjoint, 1e-3, "x") == ["x prompt 0 token 0: no token in both top lists"]


def test_first_token_check_ignores_later_tokens_only():
    later = [_out([5, 8], [{"5": -0.15, "7": -2.1}, {"8": -0.2}])]
    assert first_token_failures(REF, later, 0.2, "bf16") == []
    first = [_out([7, 6], [{"7": -0.1}, {"6": -0.3}])]
    assert first_token_failures(REF, first, 0.2, "bf16") == [
        "bf16 prompt 0: first token 7, reference 5 (reference logprobs -0.1 and -2.0)"]
    unknown = [_out([8, 6], [{"8": -0.1}, {"6": -0.3}])]
    assert first_token_failures(REF, unknown, 0.2, "bf16") == [
        "bf16 prompt 0: first token 8, reference 5 (reference logprobs -0.1 and None)"]


def test_first_token_near_tie_may_flip():
    ref = [_out([5, 6], [{"5": -0.70, "7": -0.75}, {"6": -0.3}])]
    flipped = [_out([7, 9], [{"7": -0.69, "5": -0.74}, {"9": -0.2}])]
    assert first_token_failures(ref, flipped, 0.2, "bf16") == []
    assert len(first_token_failures(ref, flipped, 0.01, "bf16")) == 1
    assert len(first_token_failures(REF, [_out([5, 6], [{"5": -0.5}, {}])], 0.2, "bf16")) == 1
    assert first_token_failures(REF, [_out([], [])], 0.2, "bf16") == ["bf16 prompt 0: no tokens generated"]


def _rec(device, tp="NcclComm", pp="SingleRankComm"):
    return {"device": device, "tp_comm": tp, "pp_comm": pp, "graph_replays": 3}


def test_runners_on_their_local_gpu_with_nccl_pass():
    runners = [[_rec("cuda:0")], [_rec("cuda:1")]]
    assert runner_failures(runners, [0, 1], 2, 1, "NcclComm") == []
    assert runner_failures([[_rec("cuda:0", "SingleRankComm")]], [0], 1, 1, "SingleRankComm") == []


def test_runners_on_the_wrong_gpu_or_backend_fail():
    runners = [[_rec("cuda:0")], [_rec("cuda:0", pp="MPIComm")]]
    failures = runner_failures(runners, [0, 1], 2, 1, "NcclComm")
    assert failures == ["rank 1 job 0: device cuda:0, expected cuda:1",
                        "rank 1 job 0: pp_comm is MPIComm, expected SingleRankComm"]
    assert runner_failures([[_rec("cpu", tp="MPIComm")]], [0], 2, 1, "NcclComm")[1] == (
        "rank 0 job 0: tp_comm is MPIComm, expected NcclComm")
    assert runner_failures([[], [_rec("cuda:1")]], [0, 1], 2, 1, "NcclComm") == ["rank 0: no ModelRunner recorded"]
    assert runner_failures([[_rec("cuda:0")]], [0, 1], 2, 1, "NcclComm") == ["1 ranks reported runners, expected 2"]
