"""Rank 0's end of ``LLM(..., tensor_parallel_size=N)`` from a plain process (see ``remote.py``).

``python -m meshlm.api.remote_rank0 --connect HOST:PORT <engine flags>`` runs on every rank of the
world the plain process started; rank 0 connects back and answers the coordinator calls.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import astuple
from multiprocessing.connection import Client

from meshlm.api.messages import (AbortCall, EngineState, Hello, Reply, ResetPrefixCacheCall, ShutdownCall, StepCall,
                                 SubmitCall, decode_call, encode_hello, encode_reply)
from meshlm.config import EngineArgs
from meshlm.engine.coordinator import Coordinator


def serve(coordinator: Coordinator, address: str) -> None:
    """Rank 0: answer the parent's calls until it asks to shut down or goes away."""
    from meshlm.launcher import env
    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=(env.get("MESHLM_RPC_AUTHKEY") or "").encode())
    conn.send_bytes(encode_hello(Hello(coordinator.max_model_len, coordinator.vocab_size,
                                       coordinator.num_kv_blocks, coordinator.max_batch_size,
                                       coordinator.max_num_tokens)))
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                break
            reply, is_shutdown = _answer(coordinator, data)
            conn.send_bytes(encode_reply(reply))
            if is_shutdown:
                break
    finally:
        coordinator.shutdown()


def _answer(coordinator: Coordinator, data: bytes) -> tuple[Reply, bool]:
    """The reply to one call, and whether the call asks rank 0 to shut down."""
    call = None
    try:
        call = decode_call(data)
        if isinstance(call, SubmitCall):
            value = coordinator.submit(call.prompt, call.params, call.request_id, call.prompt_text)
        elif isinstance(call, AbortCall):
            value = coordinator.abort(call.request_id)
        elif isinstance(call, StepCall):
            value = coordinator.step()
        elif isinstance(call, ResetPrefixCacheCall):
            value = coordinator.reset_prefix_cache()
        else:
            value = None
        reply = Reply(value)
    except (ValueError, KeyError, TypeError) as exc:  # bad input: report it, keep serving
        reply = Reply(None, type(exc).__name__, str(exc))
    spec = coordinator.spec_decode_stats
    reply.state = EngineState(coordinator.has_unfinished(), coordinator.has_pending_notices(),
                              coordinator.num_running, coordinator.num_waiting, coordinator.kv_cache_usage,
                              None if spec is None else list(astuple(spec)),
                              list(astuple(coordinator.scheduler_stats)))
    return reply, isinstance(call, ShutdownCall)


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
