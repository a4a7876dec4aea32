"""What the server tests share: an in-process server over a tiny random model, raw ASGI calls that
stream and disconnect, and the checks every answer must pass.

    with InProcessServer(model_dir) as server:           # the FastAPI app over a live AsyncLLM
        async with server.client() as http:               # httpx over ASGITransport, no sockets
            r = await http.post("/v1/completions", json={...})
        check_answer(r.status_code, r.content)           # 2xx, or 4xx with OpenAI's envelope
        await server.wait_idle()                         # KV pool and gauges back to zero
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.model_factory import make_random_model

MAX_MODEL_LEN = 128
# Words of the tiny tokenizer (``w3`` ... ``w319``): text prompts made of them tokenize one to one.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w3{% endif %}")


def make_model_dir(path: Path) -> Path:
    """A tiny random llama (1 layer) whose tokenizer has a chat template."""
    make_random_model(path, "llama", num_hidden_layers=1, seed=3)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    return path


class InProcessServer:
    """The app of ``meshlm serve`` over a local coordinator, in this process."""

    def __init__(self, model_dir: Path, num_kv_blocks: int = 64, **limits):
        from meshlm.api.async_llm import AsyncLLM
        from meshlm.api.start import start_runtime
        from meshlm.config import EngineArgs
        from meshlm.server.app import build_app
        from meshlm.server.limits import ServerLimits
        from meshlm.server.metrics import ServerMetrics
        from meshlm.server.serving import ServedModel
        args = EngineArgs(model=str(model_dir), device="cpu", num_kv_blocks=num_kv_blocks,
                          max_model_len=MAX_MODEL_LEN, enable_cuda_graphs=False)
        self.coordinator = start_runtime(args)
        self.engine = AsyncLLM.from_engine_core(self.coordinator)
        name = model_dir.name
        self.served = ServedModel(self.engine, name, str(model_dir), MAX_MODEL_LEN, ServerMetrics(name),
                                  limits=ServerLimits(**limits))
        self.app = build_app(self.served)

    def __enter__(self) -> "InProcessServer":
        return self

    def __exit__(self, *exc) -> None:
        self.served.pool.shutdown(wait=True, cancel_futures=True)
        self.engine.shutdown()

    def client(self, timeout_s: float = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://server",
                                 timeout=timeout_s)

    def gauges(self) -> dict:
        return self.engine.stats()

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until no request runs or waits and the KV pool is empty; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.gauges()
            if stats == {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0} and \
                    not self.coordinator.has_unfinished():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the engine is not idle {timeout_s} s after the clients left: {stats}")
            await asyncio.sleep(0.02)

    async def check_serving(self) -> None:
        """A normal request still completes, and the engine loop is healthy."""
        assert self.engine.is_healthy
        async with self.client() as http:
            r = await http.post("/v1/completions", json={"prompt": "w5 w6 w7", "max_tokens": 3,
                                                         "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 3
            assert (await http.get("/health")).status_code == 200


def check_answer(status: int, content: bytes, context: object = None) -> None:
    """2xx, or 4xx with OpenAI's error envelope (499 for a client that left); never 5xx."""
    assert 200 <= status < 500, (status, content[:500], str(context)[:500])
    if 400 <= status < 500 and status != 499:
        body = json.loads(content)
        assert set(body) == {"error"}, (status, body)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error


async def asgi_call(app, method: str, path: str, body: bytes, leave_after_chunks: int | None = None,
                    read_delay_s: float = 0.0, timeout_s: float = 30.0) -> tuple[int | None, list[bytes]]:
    """Call the ASGI app as a server would: the response streams in, each body chunk taking
    ``read_delay_s`` to be taken, and after ``leave_after_chunks`` chunks the client disconnects
    (``http.disconnect``).

    Returns (status, body chunks received).
    """
    status, chunks = None, []
    left = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if left.is_set():
            raise OSError("the client has gone")  # what a real server's send does after a disconnect
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            await asyncio.sleep(read_delay_s)  # a slow reader: the send waits as on a full socket
            if message.get("body"):
                chunks.append(message["body"])
            if leave_after_chunks is not None and len(chunks) >= leave_after_chunks:
                left.set()
            if not message.get("more_body", False):
                left.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("server", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout_s)
    return status, chunks


# --- a real server in a subprocess ---------------------------------------------------------------
_READY = re.compile(r"serving \S+ on http://127\.0\.0\.1:(\d+)")


class ServeProcess:
    """``meshlm serve --port 0`` on a model directory, CPU, in its own process group."""

    def __init__(self, model_dir: Path, log_path: Path, *flags: str, startup_timeout_s: float = 120.0):
        argv = [sys.executable, "-m", "meshlm", "serve", "--model", str(model_dir), "--port", "0",
                "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", *flags]
        env = {k: v for k, v in os.environ.items() if not re.match(r"^(PMI_|PMIX_|OMPI_|HYDRA_|SLURM_)", k)}
        env.update(MESHLM_DEVICE="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            self.port = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = _READY.search(self.log())
            if match:
                return int(match.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"the server was not ready within {timeout_s} s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()
        return self.proc.returncode
