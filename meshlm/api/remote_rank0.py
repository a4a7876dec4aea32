"""Rank 0's end of ``LLM(..., tensor_parallel_size=N)`` from a plain process (see ``remote.py``).

``python -m meshlm.api.remote_rank0 --connect HOST:PORT <engine flags>`` runs on every rank of the
world the plain process started; rank 0 connects back and answers the coordinator calls.
"""
from __future__ import annotations

import argparse
import sys
from multiprocessing.connection import Client

from meshlm.config import EngineArgs


def serve(coordinator, address: str) -> None:
    """Rank 0: answer the parent's calls until it asks to shut down or goes away."""
    from meshlm.launcher import env
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=(env.get("MESHLM_RPC_AUTHKEY") or "").encode())
    methods = {"submit", "abort", "step", "has_unfinished"}
    try:
        while True:
            try:
                method, args, kwargs = conn.recv()
            except EOFError:
                break
            if method == "shutdown":
                conn.send((True, None))
                break
            if method not in methods:
                conn.send((False, ValueError(f"unknown call {method!r}")))
                continue
            try:
                conn.send((True, getattr(coordinator, method)(*args, **kwargs)))
            except (ValueError, KeyError) as exc:  # bad input: report, keep serving
                conn.send((False, exc))
    finally:
        coordinator.shutdown()


def main(argv: list[str] | None = None) -> int:
    from meshlm.launcher.logging import setup_logging
    from meshlm.api.start import start_runtime
    parser = argparse.ArgumentParser(prog="python -m meshlm.api.remote_rank0")
    parser.add_argument("--connect", required=True)
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    setup_logging()
    coordinator = start_runtime(EngineArgs.from_cli(ns))  # ranks other than 0 exit inside
    serve(coordinator, ns.connect)
    return 0


if __name__ == "__main__":
    sys.exit(main())
