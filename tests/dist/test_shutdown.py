"""SIGTERM to mpiexec while a long prefill step runs: the step finishes, then every rank exits 0,
with no abort and no error from the engine loop after the server's event loop has closed."""
from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.dist.proc_tree import descendants, wait_until_gone
from tests.server_process import ServerProcess, server_env

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MPIEXEC = Path(sys.executable).parent / "mpiexec"
RUN_SLOW_SERVER = Path(__file__).resolve().parent / "run_slow_server.py"
pytestmark = [pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}"),
              pytest.mark.timeout(180)]

PREFILL_S = 4.0  # how long each prefill step sleeps on every rank
PROMPT = list(range(3, 203))  # 200 token ids of the test tokenizer's vocabulary


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tests.model_factory import make_random_model
    return make_random_model(tmp_path_factory.mktemp("shutdown-tiny") / "llama", "llama")


def _wait_for(server: ServerProcess, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s} s:\n{server.log()[-4000:]}"
        time.sleep(0.05)


def test_sigterm_during_a_long_prefill_exits_0(tiny_llama, tmp_path):
    from meshlm.launcher.world import mpiexec_command
    argv = mpiexec_command(2, [sys.executable, str(RUN_SLOW_SERVER), str(PREFILL_S), "serve", "--tp", "2",
                               "--model", str(tiny_llama), "--port", "0", "--served-model-name", "tiny",
                               "--max-model-len", "512", "--num-kv-blocks", "64"])
    server = ServerProcess(argv, tmp_path / "server.log", env=server_env(OMP_NUM_THREADS="1"))
    try:
        ranks = [p["pid"] for p in descendants(server.proc.pid) if "run_slow_server.py" in p["cmdline"]]
        assert len(ranks) == 2, descendants(server.proc.pid)
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True}
        replies: list = []
        client = threading.Thread(target=lambda: replies.append(
            httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)), daemon=True)
        client.start()
        _wait_for(server, "[run_slow_server rank 0] prefill step begun", timeout_s=60)
        code = server.stop(signal.SIGTERM, timeout_s=90)
        log = server.log()
        assert code == 0, f"mpiexec exited {code} after SIGTERM mid-step:\n{log[-6000:]}"
        for rank in (0, 1):  # the step in progress finished on every rank
            assert f"[run_slow_server rank {rank}] prefill step ended" in log, log[-6000:]
        for sign in ("terminate called", "Aborted", "Event loop is closed", "fatal error", "BAD TERMINATION"):
            assert sign not in log, log[-6000:]
        assert "server stopped" in log, log[-6000:]
        assert wait_until_gone(ranks) == [], "ranks outlived mpiexec"
        client.join(timeout=30)
        # The request had not produced a token yet: it ends with 503 (README: Serve).
        assert replies and replies[0].status_code == 503, replies
        assert "error" in replies[0].json(), replies[0].text
    finally:
        server.kill()
