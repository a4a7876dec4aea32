"""How the multi-GPU tests judge agreement: plain functions over lists and dicts (no torch, no
pytest), so that the rank scripts can use them and a CPU unit test can check them.

Each returns a list of failures, one line each, empty when everything agrees; a test asserts the
list is empty and prints it otherwise.
"""
from __future__ import annotations

import math


def collective_failures(checks: list[dict], tolerances: dict[str, float]) -> list[str]:
    """Lines for the checks whose NCCL result differs from the MPI one.

    A check is ``{"layout", "name", "rank", "dtype", "nccl_shape", "mpi_shape", "max_abs_diff"}``
    (shapes as lists, or None where the collective returns None on that rank); ``tolerances`` maps
    a dtype name to the largest allowed difference (0.0: bit-equal). A dtype missing from it fails.
    """
    failures = []
    for c in checks:
        where = f"{c['layout']} {c['name']} rank {c['rank']} {c['dtype']}"
        if c["nccl_shape"] != c["mpi_shape"]:
            failures.append(f"{where}: NCCL gave shape {c['nccl_shape']}, MPI {c['mpi_shape']}")
            continue
        if c["dtype"] not in tolerances:
            failures.append(f"{where}: no tolerance for dtype {c['dtype']}")
            continue
        diff = c["max_abs_diff"]
        if diff is not None and not (diff <= tolerances[c["dtype"]]):  # NaN fails too
            failures.append(f"{where}: max |NCCL - MPI| = {diff!r} > {tolerances[c['dtype']]!r}")
    return failures


def greedy_failures(ref: list[dict], got: list[dict], logprob_tol: float, where: str) -> list[str]:
    """Every prompt's greedy tokens equal, and each step's logprobs of the tokens both runs list
    agree within ``logprob_tol``. ``ref`` and ``got`` are run_layout.py results (one dict per
    prompt: ``token_ids`` and ``logprobs``, a ``{token id: logprob}`` per generated token)."""
    if len(ref) != len(got):
        return [f"{where}: {len(got)} results, the reference has {len(ref)}"]
    failures = []
    for i, (r, g) in enumerate(zip(ref, got)):
        if g["token_ids"] != r["token_ids"]:
            failures.append(f"{where} prompt {i}: tokens {g['token_ids']}, reference {r['token_ids']}")
            continue
        for step, (r_top, g_top) in enumerate(zip(r["logprobs"], g["logprobs"])):
            failures += _logprob_failures(r_top, g_top, logprob_tol, f"{where} prompt {i} token {step}")
    return failures


def first_token_failures(ref: list[dict], got: list[dict], logprob_tol: float, where: str) -> list[str]:
    """The 16-bit check: every prompt's first token equal and its logprobs within ``logprob_tol``.

    Rounding in another order can flip a near-tie, so another first token passes when the reference
    ranks it within ``logprob_tol`` of its own; later tokens may then part ways and are not compared.
    """
    if len(ref) != len(got):
        return [f"{where}: {len(got)} results, the reference has {len(ref)}"]
    failures = []
    for i, (r, g) in enumerate(zip(ref, got)):
        if not r["token_ids"] or not g["token_ids"]:
            failures.append(f"{where} prompt {i}: no tokens generated")
            continue
        got_token, ref_token = str(g["token_ids"][0]), str(r["token_ids"][0])
        ref_top = r["logprobs"][0]
        if got_token != ref_token and not (got_token in ref_top and ref_top[ref_token] - ref_top[got_token] <= logprob_tol):
            failures.append(f"{where} prompt {i}: first token {got_token}, reference {ref_token}"
                            f" (reference logprobs {ref_top.get(ref_token)} and {ref_top.get(got_token)})")
            continue
        failures += _logprob_failures(r["logprobs"][0], g["logprobs"][0], logprob_tol, f"{where} prompt {i} token 0")
    return failures


def _logprob_failures(ref: dict[str, float], got: dict[str, float], tol: float, where: str) -> list[str]:
    shared = ref.keys() & got.keys()
    if not shared:
        return [f"{where}: no token in both top lists"]
    return [f"{where}: logprob of {t} is {got[t]!r}, reference {ref[t]!r}" for t in sorted(shared)
            if not (math.isfinite(got[t]) and abs(got[t] - ref[t]) <= tol)]


def runner_failures(runners: list[list[dict]], local_ranks: list[int], tp: int, pp: int,
                    comm_class: str) -> list[str]:
    """Every rank's every ModelRunner (run_layout.py ``--report-runners``) ran on
    ``cuda:<its node-local rank>``, with ``comm_class`` communicators on the axes that have peers
    (tp > 1, pp > 1) and ``SingleRankComm`` on the others."""
    if len(runners) != len(local_ranks):
        return [f"{len(runners)} ranks reported runners, expected {len(local_ranks)}"]
    expected = {"tp_comm": comm_class if tp > 1 else "SingleRankComm",
                "pp_comm": comm_class if pp > 1 else "SingleRankComm"}
    failures = []
    for rank, (records, local_rank) in enumerate(zip(runners, local_ranks)):
        if not records:
            failures.append(f"rank {rank}: no ModelRunner recorded")
        for job, rec in enumerate(records):
            if rec["device"] != f"cuda:{local_rank}":
                failures.append(f"rank {rank} job {job}: device {rec['device']}, expected cuda:{local_rank}")
            failures += [f"rank {rank} job {job}: {axis} is {rec[axis]}, expected {name}"
                         for axis, name in expected.items() if rec[axis] != name]
    return failures
