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

from meshlm.api.messages import (AbortCall, Call, EngineState, Hello, ResetPrefixCacheCall, ShutdownCall,
                                 StepCall, SubmitCall, decode_hello, decode_reply, encode_call)
from meshlm.config import EngineArgs, EngineConfig
from meshlm.engine.outputs import RequestOutput
from meshlm.engine.scheduler import SchedulerStats, SpecDecodeStats
from meshlm.engine.tokenizer import Tokenizer
from meshlm.sampling_params import SamplingParams

log = logging.getLogger("meshlm")

_CONNECT_TIMEOUT_S = 900  # loading a large model can take minutes


class RemoteCoordinator:
    """Rank 0's coordinator seen from the plain process that started the MPI world: every call
    travels as a typed message (``meshlm.api.messages``); implements ``EngineCore``."""

    def __init__(self, proc: subprocess.Popen, conn, tokenizer: Tokenizer | None, hello: Hello):
        self._proc, self._conn = proc, conn
        self.tokenizer = tokenizer
        self.max_model_len = hello.max_model_len
        self.vocab_size = hello.vocab_size
        self.num_kv_blocks = hello.num_kv_blocks
        self.max_batch_size = hello.max_batch_size
        self.max_num_tokens = hello.max_num_tokens
        self._state = EngineState()
        self._lock = threading.Lock()

    @classmethod
    def launch(cls, args: EngineArgs, config: EngineConfig) -> "RemoteCoordinator":
        """Start ``config.parallel.world_size`` ranks under mpiexec and connect to rank 0."""
        from meshlm.launcher.world import mpiexec_command
        args = EngineArgs(**{**{k: getattr(args, k) for k in args.__slots__}, "model": str(config.model_dir)})
        authkey = secrets.token_hex(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey.encode())
        host, port = listener.address
        cmd = mpiexec_command(config.parallel.world_size, [sys.executable, "-m", "meshlm.api.remote_rank0",
                                                           "--connect", f"{host}:{port}", *args.to_cli()])
        proc = subprocess.Popen(cmd, env={**os.environ, "MESHLM_RPC_AUTHKEY": authkey})
        conn = _accept(listener, proc)
        hello = decode_hello(conn.recv_bytes())
        tokenizer = None if config.skip_tokenizer_init else Tokenizer(config.model_dir)
        return cls(proc, conn, tokenizer, hello)

    def _call(self, call: Call):
        with self._lock:
            try:
                self._conn.send_bytes(encode_call(call))
                reply = decode_reply(self._conn.recv_bytes(), call)
            except (EOFError, OSError):
                code = self._proc.wait(timeout=60)
                raise RuntimeError(f"the {type(call).__name__} failed: the MPI ranks ended (mpiexec exit "
                                   f"code {code}); their output above names the rank") from None
            self._state = reply.state
        if reply.error is not None:
            raise (KeyError if reply.error_type == "KeyError" else ValueError)(reply.error)
        return reply.value

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               request_id: str | None = None, prompt_text: str | None = None) -> str:
        return self._call(SubmitCall(prompt, params or SamplingParams(), request_id, prompt_text))

    def abort(self, request_id: str) -> bool:
        return self._call(AbortCall(request_id))

    def step(self) -> list[RequestOutput]:
        return self._call(StepCall())

    def reset_prefix_cache(self) -> None:
        self._call(ResetPrefixCacheCall())

    def has_unfinished(self) -> bool:
        return self._state.has_unfinished

    def has_pending_notices(self) -> bool:
        return self._state.has_pending_notices

    @property
    def num_running(self) -> int:
        return self._state.num_running

    @property
    def num_waiting(self) -> int:
        return self._state.num_waiting

    @property
    def kv_cache_usage(self) -> float:
        return self._state.kv_cache_usage

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        counts = self._state.spec_decode
        return None if counts is None else SpecDecodeStats(*counts)

    @property
    def scheduler_stats(self) -> SchedulerStats:
        return SchedulerStats(*self._state.scheduler)

    def shutdown(self) -> None:
        if self._proc is None:
            return
        try:
            self._call(ShutdownCall())
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
