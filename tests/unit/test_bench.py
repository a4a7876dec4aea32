"""``meshlm bench throughput`` on the default model (one rank, and tp=3 through the mpiexec relaunch)
and ``meshlm bench serve`` against a stub OpenAI-compatible SSE server in this process (and against
``meshlm serve`` when that subcommand exists), all through the real command line."""
from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, NUM_KV_BLOCKS, BLOCK_SIZE = 8, 32, 8, 64, 16

pytestmark = pytest.mark.timeout(300)


def meshlm(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "meshlm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


def check_distribution(stats: dict, name: str, may_be_empty: bool = False) -> None:
    assert set(stats) == {"mean", "p50", "p90", "p99"}, name
    if may_be_empty and stats["mean"] is None:
        return
    assert all(isinstance(v, float) and v >= 0 for v in stats.values()), (name, stats)
    assert stats["p50"] <= stats["p90"] <= stats["p99"], (name, stats)


def check_summary(r: dict, num_requests: int, completed: int, num_gpus: int | None) -> None:
    """Every field of a run's summary, with its type and a sane value."""
    assert (r["num_requests"], r["completed"], r["failed"]) == (num_requests, completed, num_requests - completed)
    assert isinstance(r["duration_s"], float) and r["duration_s"] > 0
    assert isinstance(r["total_input_tokens"], int) and r["total_input_tokens"] > 0
    assert isinstance(r["total_output_tokens"], int) and r["total_output_tokens"] > 0
    for key, amount in (("request_throughput", completed), ("output_throughput", r["total_output_tokens"]),
                        ("total_token_throughput", r["total_input_tokens"] + r["total_output_tokens"])):
        assert r[key] > 0 and r[key] == pytest.approx(amount / r["duration_s"]), key
        per_gpu = r[f"{key}_per_gpu"]
        assert per_gpu is None if num_gpus is None else per_gpu == pytest.approx(r[key] / num_gpus), key
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        check_distribution(r[name], name)
    assert r["ttft_ms"]["p99"] <= r["e2e_ms"]["p99"]


# --- bench throughput ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    from meshlm.weights.default_model import ensure_default_model
    ensure_default_model()
    out = tmp_path_factory.mktemp("bench")
    proc = meshlm("bench", "throughput", "--num-prompts", str(NUM_PROMPTS), "--input-len", str(INPUT_LEN),
                  "--output-len", str(OUTPUT_LEN), "--max-model-len", "512", "--num-kv-blocks", str(NUM_KV_BLOCKS),
                  "--block-size", str(BLOCK_SIZE), "--warmup", "2", "--sweep-concurrency", "2,inf",
                  "--output-json", str(out / "r.json"), "--plot", str(out / "r.png"))
    return proc, json.loads((out / "r.json").read_text()), out / "r.png"


def test_throughput_step_account(offline):
    """The run's steps: every prompt token prefilled once and every later token decoded once when
    nothing was preempted (recomputes add prefill tokens), and the wall time charged to them."""
    _, r, _ = offline
    steps = r["steps"]
    if steps["num_preemptions"] == 0:
        assert steps["num_prefill_tokens"] == NUM_PROMPTS * INPUT_LEN
        assert steps["num_decode_tokens"] == NUM_PROMPTS * (OUTPUT_LEN - 1)
    else:
        assert steps["num_prefill_tokens"] > NUM_PROMPTS * INPUT_LEN
    assert steps["num_steps"] >= OUTPUT_LEN and steps["num_decode_only_steps"] < steps["num_steps"]
    charged = steps["prefill_step_time_s"] + steps["decode_step_time_s"] + steps["unrecorded_time_s"]
    assert steps["prefill_step_time_s"] > 0 and steps["decode_step_time_s"] > 0
    assert 0.5 * r["duration_s"] < charged <= r["duration_s"]
    assert 1 <= steps["mean_decode_batch"] <= NUM_PROMPTS


def test_throughput_json_fields(offline):
    _, r, _ = offline
    expected_keys = {"config", "num_requests", "completed", "failed", "duration_s", "total_input_tokens",
                     "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
                     "request_throughput_per_gpu", "output_throughput_per_gpu", "total_token_throughput_per_gpu",
                     "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "peak_kv_cache_usage", "steps", "sweep"}
    assert set(r) == expected_keys
    check_summary(r, NUM_PROMPTS, NUM_PROMPTS, num_gpus=1)
    # ignore_eos and greedy: exactly the asked lengths
    assert r["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert r["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
    # The last step before the requests finish holds INPUT_LEN + OUTPUT_LEN - 1 tokens of each
    # (the last sampled token is never fed back): ceil(39 / 16) = 3 blocks each, all 8 at once.
    blocks = NUM_PROMPTS * math.ceil((INPUT_LEN + OUTPUT_LEN - 1) / BLOCK_SIZE)
    assert 0 < r["peak_kv_cache_usage"] <= 1
    assert r["peak_kv_cache_usage"] == pytest.approx(blocks / NUM_KV_BLOCKS)
    # TPOT of each request lies between its smallest and largest gap; with 8 equal requests the
    # mean TPOT equals the mean ITL: both are (e2e - ttft) summed over requests / 7 gaps each.
    assert r["tpot_ms"]["mean"] == pytest.approx(r["itl_ms"]["mean"], rel=1e-6)
    assert r["e2e_ms"]["mean"] == pytest.approx(r["ttft_ms"]["mean"] + (OUTPUT_LEN - 1) * r["tpot_ms"]["mean"])


def test_throughput_config(offline):
    _, r, _ = offline
    c = r["config"]
    assert (c["backend"], c["mode"], c["model"], c["device"]) == ("meshlm", "offline", "SmolLM2-135M-Instruct", "cpu")
    assert (c["tp"], c["pp"], c["ep"], c["num_gpus"]) == (1, 1, 1, 1)
    assert (c["num_prompts"], c["input_len"], c["output_len"]) == (NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN)
    assert (c["input_stdev"], c["output_stdev"], c["dataset"], c["warmup"]) == (0.0, 0.0, None, 2)
    assert (c["max_model_len"], c["num_kv_blocks"], c["block_size"]) == (512, NUM_KV_BLOCKS, BLOCK_SIZE)
    assert c["max_concurrency"] is None  # the sweep's last point: no limit
    assert isinstance(c["dtype"], str) and isinstance(c["date"], str) and isinstance(c["meshlm_version"], str)
    assert isinstance(c["seed"], int) and isinstance(c["max_num_tokens"], int) and isinstance(c["max_batch_size"], int)


def test_throughput_sweep(offline):
    _, r, _ = offline
    assert [p["max_concurrency"] for p in r["sweep"]] == [2, None]
    for point in r["sweep"]:
        check_summary(point, NUM_PROMPTS, NUM_PROMPTS, num_gpus=1)
        assert point["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    two, unbounded = r["sweep"]
    # Two at a time hold 2 x 3 blocks at their peak.
    assert two["peak_kv_cache_usage"] == pytest.approx(2 * 3 / NUM_KV_BLOCKS)
    assert unbounded["output_throughput"] == r["output_throughput"]  # the top level is the last point
    assert two["ttft_ms"]["p50"] < unbounded["ttft_ms"]["p50"]  # 2 prefills per step instead of 8


def test_throughput_table_and_plot(offline):
    proc, r, png = offline
    assert "Output token throughput" in proc.stdout and "TPOT" in proc.stdout
    assert f"{r['completed']:>6} / {r['failed']:<4}" in proc.stdout
    assert "benchmark" in proc.stderr and "warm-up" in proc.stderr  # progress bars go to stderr
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_throughput_tp3_relaunch(tmp_path):
    # A plain process with --tp 3 relaunches itself under mpiexec; rank 0 writes the result.
    out = tmp_path / "tp3.json"
    proc = meshlm("bench", "throughput", "--tp", "3", "--num-prompts", "3", "--input-len", "12",
                  "--output-len", "4", "--input-stdev", "3", "--max-model-len", "128", "--warmup", "1",
                  "--output-json", str(out), "--no-progress")
    assert "starting 3 ranks" in proc.stderr
    assert proc.stdout.count("meshlm bench throughput") == 1  # only rank 0 reports
    r = json.loads(out.read_text())
    assert (r["config"]["tp"], r["config"]["num_gpus"]) == (3, 3)
    check_summary(r, 3, 3, num_gpus=3)
    assert r["total_output_tokens"] == 3 * 4
    assert 0 < r["peak_kv_cache_usage"] <= 1


def test_throughput_bad_dataset_line_fails_clearly(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "output_len": 2}\n{"prompt": "hi"}\n')
    proc = subprocess.run([sys.executable, "-m", "meshlm", "bench", "throughput", "--dataset", str(data)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{data} line 2" in proc.stderr and "output_len" in proc.stderr


# --- bench serve against a stub server -----------------------------------------------------------

FIRST_TOKEN_DELAY_S, TOKEN_GAP_S, SLOW_S = 0.05, 0.01, 30.0


class StubServer:
    """An OpenAI-style completions server: max_tokens chunks after fixed delays, usage last.

    Prompts containing FAIL get HTTP 500; prompts containing SLOW stall for SLOW_S seconds.
    """

    def __init__(self):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route
        self.bodies, self.headers, self.in_flight, self.max_in_flight = [], [], 0, 0

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "stub-model", "object": "model"}]})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            self.headers.append(dict(request.headers))
            prompt = body["prompt"]
            if isinstance(prompt, str) and "FAIL" in prompt:
                return JSONResponse({"error": {"message": "stub failure"}}, status_code=500)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        app = Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    async def _stream(self, body):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            prompt = body["prompt"]
            await asyncio.sleep(SLOW_S if isinstance(prompt, str) and "SLOW" in prompt else FIRST_TOKEN_DELAY_S)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    await asyncio.sleep(TOKEN_GAP_S)
                chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            num_in = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            usage = {"prompt_tokens": num_in, "completion_tokens": n, "total_tokens": num_in + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "stub server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


def test_serve_synthetic_against_stub(tmp_path):
    pytest.importorskip("uvicorn")
    with StubServer() as stub:
        proc = meshlm("bench", "serve", "--base-url", stub.url, "--num-prompts", "6", "--input-len", "10",
                      "--output-len", "5", "--concurrency", "2", "--warmup", "1", "--num-gpus", "1",
                      "--output-json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"), timeout=120)
    r = json.loads((tmp_path / "s.json").read_text())
    assert set(r) == {"config", "num_requests", "completed", "failed", "duration_s", "total_input_tokens",
                      "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
                      "request_throughput_per_gpu", "output_throughput_per_gpu", "total_token_throughput_per_gpu",
                      "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "peak_kv_cache_usage", "errors"}
    check_summary(r, 6, 6, num_gpus=1)
    assert (r["total_output_tokens"], r["total_input_tokens"]) == (6 * 5, 6 * 10)  # from the usage chunks
    assert r["peak_kv_cache_usage"] is None and r["errors"] == []
    # The stub waits FIRST_TOKEN_DELAY_S before the first chunk and TOKEN_GAP_S between chunks.
    assert r["ttft_ms"]["p50"] >= 1e3 * FIRST_TOKEN_DELAY_S
    assert r["itl_ms"]["p50"] >= 1e3 * TOKEN_GAP_S * 0.9 and r["tpot_ms"]["p50"] >= 1e3 * TOKEN_GAP_S * 0.9
    c = r["config"]
    assert (c["backend"], c["mode"], c["model"], c["base_url"], c["endpoint"]) == (
        "openai-completions", "serve", "stub-model", stub.url, "/v1/completions")
    assert (c["max_concurrency"], c["request_rate"], c["num_prompts"], c["warmup"], c["num_gpus"]) == (2, None, 6, 1, 1)
    assert (c["prompt_format"], c["input_len"], c["output_len"]) == ("text", 10, 5)
    assert c["request_timeout_s"] > 0 and isinstance(c["date"], str)
    # What the server saw: 1 warm-up + 6 requests, never more than 2 at once, OpenAI streaming fields.
    assert len(stub.bodies) == 7 and 1 <= stub.max_in_flight <= 2
    for body in stub.bodies:
        assert body["model"] == "stub-model" and body["max_tokens"] == 5 and body["temperature"] == 0
        assert body["stream"] is True and body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert isinstance(body["prompt"], str) and len(body["prompt"].split()) == 10
    assert len({b["prompt"] for b in stub.bodies}) == 7  # random prompts: no prefix-cache freebies
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    assert "meshlm bench serve" in proc.stdout


def test_serve_dataset_failures_and_poisson(tmp_path):
    pytest.importorskip("uvicorn")
    lines = [{"prompt": "one two three", "output_len": 3}, {"prompt": "please FAIL now", "output_len": 4},
             {"prompt": [5, 6, 7, 8], "max_tokens": 2}, {"prompt": "a SLOW one", "output_len": 3},
             {"prompt": "four five", "max_tokens": 4}, {"prompt": "six", "output_len": 5}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # The timeout sits far from both sides: the quick requests take ~0.1 s (a loaded 2-core machine has
    # stretched them past 1 s), the SLOW one stalls SLOW_S.
    rate, seed, TIMEOUT_S = 20.0, 7, 5
    with StubServer() as stub:
        meshlm("bench", "serve", "--base-url", stub.url, "--model", "my-model", "--dataset", str(data),
               "--request-rate", str(rate), "--seed", str(seed), "--warmup", "0", "--request-timeout", str(TIMEOUT_S),
               "--api-key", "secret", "--no-progress", "--output-json", str(tmp_path / "s.json"), timeout=120)
    r = json.loads((tmp_path / "s.json").read_text())
    errors = {e["error"].split(":")[0]: e["count"] for e in r["errors"]}
    assert errors == {"HTTP 500": 1, f"timed out after {TIMEOUT_S} s": 1}, r["errors"]
    check_summary(r, 6, 4, num_gpus=None)
    assert r["total_output_tokens"] == 3 + 2 + 4 + 5
    assert r["total_input_tokens"] == 3 + 4 + 2 + 1
    assert r["config"]["request_rate"] == rate and r["config"]["dataset"] == str(data)
    assert r["config"]["input_len"] is None and r["config"]["num_prompts"] == 6
    assert r["config"]["prompt_format"] == "mixed"  # text lines and one line of token ids
    # Poisson arrivals: the i-th request is sent after i exponential gaps of mean 1/rate.
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(lines) - 1)
    assert r["duration_s"] >= gaps.sum()
    assert [b["model"] for b in stub.bodies] == ["my-model"] * 6
    assert [b["prompt"] for b in stub.bodies] == [x["prompt"] for x in lines]  # token ids stay a list
    assert all(h["authorization"] == "Bearer secret" for h in stub.headers)


def test_serve_unreachable_server_fails_clearly():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "meshlm", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                           "--num-prompts", "2", "--input-len", "4", "--output-len", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "/v1/models" in proc.stderr and "--model" in proc.stderr


# --- bench serve against meshlm serve ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    """``meshlm serve`` on the default model, on a free port; skipped where the subcommand is missing."""
    httpx = pytest.importorskip("httpx")
    probe = subprocess.run([sys.executable, "-m", "meshlm", "serve", "--help"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("this meshlm has no `serve` subcommand")
    from meshlm.weights.default_model import ensure_default_model
    model_dir = ensure_default_model()
    port, log = _free_port(), tmp_path_factory.mktemp("serve") / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "meshlm", "serve", "--port", str(port),
                                   "--max-model-len", "256"], cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"meshlm serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"meshlm serve not up in 120 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url, json.loads((model_dir / "config.json").read_text())["vocab_size"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.mark.parametrize("prompt_format", ["text", "token_ids"])
def test_serve_against_meshlm_serve(live_server, tmp_path, prompt_format):
    url, vocab_size = live_server
    ids = ["--vocab-size", str(vocab_size)] if prompt_format == "token_ids" else []
    meshlm("bench", "serve", "--base-url", url, "--num-prompts", "6", "--input-len", "16", "--output-len", "6",
           "--concurrency", "3", "--warmup", "1", "--num-gpus", "1", "--no-progress", *ids,
           "--output-json", str(tmp_path / "s.json"), timeout=180)
    r = json.loads((tmp_path / "s.json").read_text())
    check_summary(r, 6, 6, num_gpus=1)
    assert r["total_output_tokens"] == 6 * 6 and r["errors"] == []  # the server honours ignore_eos
    assert r["config"]["model"] == "SmolLM2-135M-Instruct" and r["config"]["prompt_format"] == prompt_format
    if prompt_format == "token_ids":
        assert r["total_input_tokens"] == 6 * 16  # the server's usage counts exactly the ids sent
