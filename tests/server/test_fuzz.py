"""Thousands of random and mutated requests against the in-process server: every answer is 2xx or a
4xx with OpenAI's envelope (never a 5xx, never a hang), the server keeps serving, and when the
clients are done no request runs or waits and the KV pool is empty.

The generator is seeded: a failure names the request that caused it and repeats on every run.
"""
from __future__ import annotations

import asyncio
import json
import random

from tests.server.harness import InProcessServer, check_answer

NUM_REQUESTS = 2500
CONCURRENCY = 32
BODY_LIMIT = 64 * 1024  # small, so the fuzzer reaches it cheaply

_WORDS = [f"w{i}" for i in range(3, 40)]
_STRING_FIELDS = ("model", "stop", "user", "prompt")
_NUMBER_FIELDS = ("n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs", "top_logprobs",
                  "max_completion_tokens", "best_of")
_FLAG_FIELDS = ("stream", "echo", "ignore_eos", "logprobs", "include_stop_str_in_output",
                "skip_special_tokens", "add_generation_prompt")


def _junk_value(rng: random.Random, depth: int = 0):
    """A value of a random JSON type, often one that is hostile somewhere."""
    choices = [
        lambda: rng.choice([0, 1, -1, 2, 7, 2**31, 2**63, 2**64 + 1, -2**63, 10**30, -10**30, 10**300]),
        lambda: rng.choice([0.0, -0.0, 0.5, 1.0, 2.5, -3.0, 1e-320, 1e-30, 1e308, -1e308,
                            float("nan"), float("inf"), float("-inf")]),
        lambda: rng.choice(["", "w5", "\ud800", "a\udfffb", "\x00", "é" * 10, "w7 " * 40, "\u2028", "null"]),
        lambda: rng.choice([True, False, None]),
        lambda: [_junk_value(rng, depth + 1) for _ in range(rng.randint(0, 4))] if depth < 4 else [],
        lambda: {rng.choice(["text", "type", "role", "content", "\ud83d", "x"]): _junk_value(rng, depth + 1)
                 for _ in range(rng.randint(0, 3))} if depth < 4 else {},
    ]
    return rng.choice(choices)()


def _prompt(rng: random.Random):
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12)))
    kind = rng.random()
    if kind < 0.6:
        return words
    if kind < 0.8:
        return [rng.randint(3, 300) for _ in range(rng.randint(1, 12))]
    return [words, words[:2] or "w3"]


def _valid_body(rng: random.Random, chat: bool) -> dict:
    body = {"max_tokens": rng.randint(1, 8), "temperature": rng.choice([0, 0.7, 1.0])}
    if chat:
        body["messages"] = [{"role": rng.choice(["user", "system", "assistant"]),
                             "content": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 8)))}
                            for _ in range(rng.randint(1, 3))]
    else:
        body["prompt"] = _prompt(rng)
    if rng.random() < 0.3:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["n"] = rng.randint(1, 3)
    if rng.random() < 0.2:
        body["stop"] = rng.choice(["w5", ["w6", "w7"]])
    if rng.random() < 0.1:
        body["seed"] = rng.randint(0, 1000)
    return body


def _mutate(rng: random.Random, body: dict) -> dict:
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        if action < 0.45:
            field = rng.choice(_NUMBER_FIELDS + _STRING_FIELDS + _FLAG_FIELDS + ("messages", "stream_options"))
            body[field] = _junk_value(rng)
        elif action < 0.6 and body:
            body.pop(rng.choice(sorted(body)))
        elif action < 0.75 and isinstance(body.get("messages"), list):
            body["messages"].append(_junk_value(rng) if rng.random() < 0.5 else
                                    {"role": "user", "content": [{"type": "text", "text": _junk_value(rng)}]})
        elif action < 0.85:
            body[rng.choice(["x", "unknown_field", "\ud800", "logit_bias", "tools", "suffix"])] = _junk_value(rng)
        else:
            body["prompt"] = _junk_value(rng)
    return body


def _raw_body(rng: random.Random) -> bytes:
    """A body that is not a valid request object at all."""
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    if kind == 1:
        return b'{"prompt": "w5", "max_tokens": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"]) + b"}"
    if kind == 2:
        return b"[" * rng.choice([10, 100, 5000]) + b"]" * rng.choice([0, 10])
    if kind == 3:
        return b'{"prompt": "' + b"w5 " * (BODY_LIMIT // 3 + 10) + b'"}'  # over the size limit
    if kind == 4:
        return json.dumps(_junk_value(rng)).encode()
    if kind == 5:
        return b'{"prompt": "\xff\xfe w5"}'  # not UTF-8
    if kind == 6:
        return b'{"prompt": "w5", "n": ' + b"9" * rng.choice([20, 5000]) + b"}"
    return b'{"messages": [{"role": "user", "content": "w5"}], "max_tokens": 2' + b"}" * rng.randint(0, 1)


def generate_cases(seed: int, count: int) -> list[tuple[str, str, bytes]]:
    """``(method, path, body)``: valid, mutated and raw bodies, plus a few odd routes and methods."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        roll = rng.random()
        chat = rng.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if roll < 0.2:
            body = json.dumps(_valid_body(rng, chat)).encode()
        elif roll < 0.8:
            body = json.dumps(_mutate(rng, _valid_body(rng, chat))).encode()  # NaN/Infinity literals too
        elif roll < 0.95:
            body = _raw_body(rng)
        else:
            method, path = rng.choice([("GET", "/v1/completions"), ("GET", "/v1/models/x"), ("POST", "/health"),
                                       ("GET", "/nowhere"), ("DELETE", "/v1/chat/completions")])
            cases.append((method, path, b"{}"))
            continue
        cases.append(("POST", path, body))
    return cases


def test_fuzzed_requests_never_break_the_server(model_dir):
    cases = generate_cases(seed=20240611, count=NUM_REQUESTS)
    statuses: dict[int, int] = {}

    async def run():
        semaphore = asyncio.Semaphore(CONCURRENCY)
        with InProcessServer(model_dir, max_request_body_bytes=BODY_LIMIT, max_n=4) as server:
            async with server.client(timeout_s=60) as http:
                async def send(case):
                    method, path, body = case
                    async with semaphore:
                        r = await http.request(method, path, content=body,
                                               headers={"content-type": "application/json"})
                    check_answer(r.status_code, r.content, case)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                await asyncio.wait_for(asyncio.gather(*(send(c) for c in cases)), timeout=120)
            await server.wait_idle()
            await server.check_serving()

    asyncio.run(run())
    # The generator reaches every kind of answer; otherwise it tests less than it claims.
    assert statuses.get(200, 0) > 200 and statuses.get(400, 0) > 500 and statuses.get(413, 0) > 10, statuses
    assert statuses.get(404, 0) and statuses.get(405, 0), statuses
