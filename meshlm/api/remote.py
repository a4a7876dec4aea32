"""``LLM(..., tensor_parallel_size=N)`` from a plain Python process.

The process starts ``mpiexec -n N python -m meshlm.api.remote_rank0 ...``; rank 0 of that world
connects back over a local authenticated socket and serves the coordinator's methods to this
process. If any rank dies, mpiexec ends them all and the link closes: the next call raises.
"""
from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Listener

from meshlm.config import EngineArgs

log = logging.getLogger("meshlm")

_CONNECT_TIMEOUT_S = 900  # loading a large model can take minutes


class RemoteCoordinator:
    """Forwards Coordinator calls to rank 0 of an MPI world this process started."""

    def __init__(self, proc: subprocess.Popen, conn, tokenizer):
        self._proc, self._conn = proc, conn
        self.tokenizer = tokenizer
        self._lock = threading.Lock()

    @classmethod
    def launch(cls, args: EngineArgs, num_ranks: int) -> "RemoteCoordinator":
        from meshlm.launcher.world import mpiexec_command
        from meshlm.api.build import check_layout
        from meshlm.weights.model_config import ModelConfig
        from meshlm.weights.default_model import resolve_model
        from meshlm.engine.tokenizer import Tokenizer

        model_dir = resolve_model(args.model)  # fetch the default model once, here
        check_layout(ModelConfig.from_dir(model_dir), args)  # fail before starting any rank
        args = EngineArgs(**{**{k: getattr(args, k) for k in args.__slots__}, "model": str(model_dir)})
        authkey = secrets.token_hex(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey.encode())
        host, port = listener.address
        cmd = mpiexec_command(num_ranks, [sys.executable, "-m", "meshlm.api.remote_rank0",
                                          "--connect", f"{host}:{port}", *args.to_cli()])
        proc = subprocess.Popen(cmd, env={**os.environ, "MESHLM_RPC_AUTHKEY": authkey})
        conn = _accept(listener, proc)
        return cls(proc, conn, Tokenizer(model_dir))

    def _call(self, method: str, *args, **kwargs):
        with self._lock:
            try:
                self._conn.send((method, args, kwargs))
                ok, value = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                code = self._proc.wait(timeout=60)
                raise RuntimeError(f"the {method}() call failed: the MPI ranks ended (mpiexec exit code "
                                   f"{code}); their output above names the rank") from None
        if not ok:
            raise value
        return value

    def submit(self, *args, **kwargs):
        return self._call("submit", *args, **kwargs)

    def abort(self, request_id: str) -> bool:
        return self._call("abort", request_id)

    def step(self):
        return self._call("step")

    def has_unfinished(self) -> bool:
        return self._call("has_unfinished")

    def shutdown(self) -> None:
        if self._proc is None:
            return
        try:
            self._call("shutdown")
        except RuntimeError:
            pass
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._conn.close()
        self._proc = None


def _accept(listener: Listener, proc: subprocess.Popen):
    """Wait for rank 0 to connect, failing early if mpiexec exits first."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("conn", listener.accept()), daemon=True)
    thread.start()
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while thread.is_alive():
        thread.join(0.2)
        if proc.poll() is not None and "conn" not in box:
            raise RuntimeError(f"the MPI ranks exited with code {proc.returncode} before rank 0 was "
                               "ready; their output above says why")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"rank 0 did not come up within {_CONNECT_TIMEOUT_S} s")
    listener.close()
    return box["conn"]
