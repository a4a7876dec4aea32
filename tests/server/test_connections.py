"""The real server (uvicorn in a subprocess) against hostile connections: idle and trickling
clients are closed after the request-read timeout, connections past the cap get 503 at once,
oversized bodies get 413 before they are read, and the open-files limit was raised.
"""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.harness import ServeProcess

READ_TIMEOUT_S = 1.0
CONNECTION_LIMIT = 16
BODY_LIMIT = 100_000


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServeProcess(model_dir, tmp_path_factory.mktemp("serve") / "server.log",
                        "--request-read-timeout", str(READ_TIMEOUT_S), "--limit-concurrency", str(CONNECTION_LIMIT),
                        "--max-request-body-bytes", str(BODY_LIMIT))
    yield proc
    proc.stop()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(10)
    return sock


def _closed_by_server(sock: socket.socket, deadline: float, trickle: bool) -> bool:
    """Wait until the server closes ``sock`` (EOF or reset); a trickling client keeps sending a
    header line. False if it is still open at ``deadline``."""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.sendall(b"X-Slow: 1\r\n")
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset, or a broken pipe on the trickle
            return True
    return False


def _wait_healthy(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not answer /health"
        time.sleep(0.1)


def test_idle_and_trickling_connections_are_closed(server):
    start = time.monotonic()
    silent = [_connect(server.port) for _ in range(6)]
    trickling = [_connect(server.port) for _ in range(6)]
    for sock in trickling:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    deadline = start + READ_TIMEOUT_S + 4
    assert all(_closed_by_server(s, deadline, trickle=False) for s in silent)
    assert all(_closed_by_server(s, deadline, trickle=True) for s in trickling)
    assert time.monotonic() - start >= READ_TIMEOUT_S * 0.8  # closed by the timeout, not at once
    for sock in silent + trickling:
        sock.close()
    _wait_healthy(server.port)


def test_connections_past_the_cap_get_503(server):
    held = [_connect(server.port) for _ in range(CONNECTION_LIMIT)]
    time.sleep(0.2)  # let the server accept all of them (bounded: they time out after READ_TIMEOUT_S)
    try:
        for _ in range(4):
            with _connect(server.port) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := extra.recv(4096):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), answer[:200]
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and str(CONNECTION_LIMIT) in error["message"]
    finally:
        for sock in held:
            sock.close()
    _wait_healthy(server.port)


def test_oversized_bodies_get_413(server):
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    with _connect(server.port) as sock:  # announces 20 MB, sends a few bytes: answered without reading
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\n\r\n{\"prompt\": \"")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 1000 + 5):
            yield b"w5 " * 333
        yield b'"}'

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and str(BODY_LIMIT) in r.json()["error"]["message"], r.text
    ok = httpx.post(url, json={"prompt": "w5 w6", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_open_files_limit_raised(server):
    limits = open(f"/proc/{server.proc.pid}/limits").read()
    (line,) = [l for l in limits.splitlines() if l.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard, line
