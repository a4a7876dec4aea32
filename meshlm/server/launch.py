"""Run the server: the HTTP front end on rank 0, the other ranks executing steps.

Rank 0 binds the port first (a port in use fails before any weight is loaded), starts the runtime,
and serves with uvicorn until SIGINT or SIGTERM. Then uvicorn stops (requests still generating end
at once: 503, or an error event and ``[DONE]`` in a stream, and their engine requests are aborted),
and the coordinator shuts down, which tells the other ranks to exit. The other ranks ignore SIGINT
and SIGTERM (mpiexec forwards a signal to every rank): they wait inside a broadcast for rank 0's
shutdown and then exit 0.

If the engine loop fails, /health answers 503, uvicorn stops as on a signal, and ``run_server``
raises: the process exits non-zero (under MPI the whole job is aborted), so a supervisor restarts it.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import socket

from meshlm.config import EngineArgs
from meshlm.server.limits import ServerLimits
from meshlm.step_limits import SERVER_MAX_NUM_TOKENS

log = logging.getLogger("meshlm")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_GRACEFUL_SHUTDOWN_S = 5  # after a signal, open connections get this long to close


class _ExitRequest:
    """SIGINT/SIGTERM handlers that ask for a clean stop, before and while uvicorn runs.

    uvicorn swaps in its own handlers while it serves, and re-raises the signal it caught after
    restoring these; they only record it, so the coordinator still shuts down afterwards.
    """

    def __init__(self):
        self.requested = False
        self.server = None
        self.engine_error: BaseException | None = None
        for sig in _SIGNALS:
            signal.signal(sig, self._handle)

    def engine_failed(self, exc: BaseException) -> None:
        """Called from the engine's thread: stop serving (setting a flag uvicorn polls)."""
        self.engine_error = exc
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            log.info("received %s: shutting down", signal.Signals(signum).name)
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True


def run_server(args: EngineArgs, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, uvicorn_log_level: str = "info",
               limits: ServerLimits | None = None, tool_options=None) -> None:
    """Serve until SIGINT/SIGTERM. Rank 0 returns after a clean shutdown; other ranks exit inside.

    Raises RuntimeError if the engine loop failed while serving."""
    limits = limits or ServerLimits()
    args = with_server_defaults(args)
    from meshlm.launcher.world import launched_by_mpi
    num_ranks = args.world_size
    if num_ranks > 1 and not launched_by_mpi():
        raise ValueError(f"tp={args.tensor_parallel_size} x pp={args.pipeline_parallel_size} needs "
                         f"{num_ranks} ranks: run `meshlm serve` (it starts them) or mpiexec -n {num_ranks}")
    if launched_by_mpi() and _world_rank() != 0:
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        _start_runtime(args)  # serves steps until rank 0 shuts down, then exits
        return
    sock = _listen(host, port)
    exit_request = _ExitRequest()
    from meshlm.api.async_llm import AsyncLLM
    engine = AsyncLLM.from_engine_args(args, on_failure=exit_request.engine_failed)
    served = None
    try:
        if not exit_request.requested:
            served = _build(engine, args, served_model_name, limits, tool_options)
            _serve(served, api_key, sock, uvicorn_log_level, exit_request)
    finally:
        sock.close()
        if served is not None:
            served.pool.shutdown(wait=False, cancel_futures=True)
        engine.shutdown()  # rank 0's coordinator tells the other ranks to exit
    if exit_request.engine_error is not None:
        raise RuntimeError(f"the engine loop failed: {exit_request.engine_error}")
    log.info("server stopped")


def with_server_defaults(args: EngineArgs) -> EngineArgs:
    """``args`` as the server runs them: steps of SERVER_MAX_NUM_TOKENS unless the user set them
    (vLLM's server default on large cards), so that a long prompt never delays decodes long."""
    if args.max_num_tokens is not None:
        return args
    return dataclasses.replace(args, max_num_tokens=SERVER_MAX_NUM_TOKENS)


def _world_rank() -> int:
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank()


def _start_runtime(args: EngineArgs):
    from meshlm.api.start import start_runtime
    return start_runtime(args)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc}") from None


def _build(engine, args: EngineArgs, served_model_name, limits: ServerLimits, tool_options):
    from meshlm.server.metrics import ServerMetrics
    from meshlm.server.serving import ServedModel
    from meshlm.server.tools import ToolOptions
    from meshlm.weights.hub import hub_repo_id
    from meshlm.weights.resolve import resolve_model
    # Already fetched when the runtime started: found in the cache, never fetched again.
    model_dir = resolve_model(args.model, args.revision, args.download_dir, local_files_only=True)
    name = served_model_name or hub_repo_id(args.model) or model_dir.name
    return ServedModel(engine, name, str(model_dir), engine.max_model_len, ServerMetrics(name),
                       limits=limits, tool_options=tool_options or ToolOptions())


def _serve(served, api_key, sock: socket.socket, log_level: str, exit_request: _ExitRequest) -> None:
    import uvicorn
    from meshlm.server.app import build_app
    from meshlm.server.connections import connection_cap, guarded_protocol, raise_open_files_limit
    app, limits = build_app(served, api_key), served.limits
    protocol = guarded_protocol(connection_cap(limits.limit_concurrency, raise_open_files_limit()),
                                limits.request_read_timeout_s)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.served.shutting_down.set()  # open requests end now, not at the grace timeout
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level=log_level, lifespan="off", http=protocol,
                            timeout_keep_alive=limits.timeout_keep_alive_s,
                            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S)
    server = Server(config)
    exit_request.server = server
    if exit_request.requested:  # a signal, or an engine failure, came while the app was built
        server.should_exit = True
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d (OpenAI API under /v1)", served.name, shown, port)
    server.run(sockets=[sock])
