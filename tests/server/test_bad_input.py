"""The inputs that once hung the server or made it answer 500, each refused with the right status,
the envelope and the parameter at fault."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.server.harness import MAX_MODEL_LEN, InProcessServer, check_answer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "w5"}]

# (path, raw JSON body, status, param, words the message must contain)
CASES = [
    (COMPLETIONS, '{"prompt": "w5", "max_tokens": 1000000000000000000000000000000}', 400, "max_tokens",
     [str(MAX_MODEL_LEN)]),
    (CHAT, json.dumps({"messages": HI, "max_completion_tokens": MAX_MODEL_LEN + 1}), 400, "max_tokens",
     [str(MAX_MODEL_LEN + 1), str(MAX_MODEL_LEN)]),
    (COMPLETIONS, '{"prompt": "w5", "n": 1000}', 400, "n", ["1000", "4", "--max-n"]),
    (COMPLETIONS, '{"prompt": ["w5", "w6", "w7"]}', 400, "prompt", ["3", "2", "--max-prompts"]),
    (COMPLETIONS, '{"prompt": "w5 \\ud800"}', 400, "prompt", ["Unicode"]),
    (CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages", ["Unicode"]),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\ud83d"}]}]}', 400,
     "messages", ["Unicode"]),
    (COMPLETIONS, '{"prompt": "w5", "temperature": Infinity}', 400, "temperature", ["finite"]),
    (COMPLETIONS, '{"prompt": "w5", "repetition_penalty": Infinity}', 400, "repetition_penalty", ["finite"]),
    (COMPLETIONS, '{"prompt": "w5", "top_p": NaN}', 400, "top_p", ["finite"]),
    (COMPLETIONS, '{"prompt": "w5", "stop_token_ids": [-1]}', 400, "stop_token_ids", []),
    (COMPLETIONS, '{"prompt": ' + '[' * 900 + ']' * 900 + '}', 400, "prompt", ["deeper"]),
    (COMPLETIONS, '[' * 1990, 400, None, []),  # deeper than Python's parser recurses
    (COMPLETIONS, '"just a string"', 400, None, ["object"]),
    (COMPLETIONS, '{"prompt": "' + "w5 " * 10000 + '"}', 413, None, ["20000", "--max-request-body-bytes"]),
    (CHAT, json.dumps({"messages": [{"role": "user", "content": "w5" * 5000}]}), 400, "messages",
     ["10000", str(MAX_MODEL_LEN)]),
    (COMPLETIONS, json.dumps({"prompt": list(range(3, MAX_MODEL_LEN + 3))}), 400, "prompt",
     [str(MAX_MODEL_LEN)]),
    # 90 prompt tokens + 50 to generate = 140 > 128: every number named, and the most that fits (38)
    (COMPLETIONS, json.dumps({"prompt": list(range(3, 93)), "max_tokens": 50}), 400, "max_tokens",
     [str(MAX_MODEL_LEN), str(90 + 50), "90", "50", str(MAX_MODEL_LEN - 90)]),
    (CHAT, json.dumps({"messages": HI, "max_tokens": MAX_MODEL_LEN - 1}), 400, "max_tokens",
     [str(MAX_MODEL_LEN), str(MAX_MODEL_LEN - 1), "messages"]),
    (COMPLETIONS, '{"prompt": "w5", "model": "no-such-model"}', 404, "model", ["no-such-model"]),
]


def test_bad_inputs_are_refused(model_dir):
    async def run():
        with InProcessServer(model_dir, max_n=4, max_prompts=2, max_request_body_bytes=20000) as server:
            async with server.client() as http:
                for path, body, status, param, words in CASES:
                    r = await http.post(path, content=body.encode(), headers={"content-type": "application/json"})
                    check_answer(r.status_code, r.content, body[:80])
                    assert r.status_code == status, (body[:80], r.text)
                    error = r.json()["error"]
                    assert error["param"] == param, (body[:80], error)
                    for word in words:
                        assert word in error["message"], (word, error)
            await server.wait_idle()
            await server.check_serving()

    asyncio.run(run())


def test_generation_stops_at_the_context_when_max_tokens_is_omitted(model_dir):
    prompt = list(range(3, 93))
    room = MAX_MODEL_LEN - len(prompt)

    async def run():
        with InProcessServer(model_dir) as server:
            async with server.client() as http:
                body = {"prompt": prompt, "ignore_eos": True, "temperature": 0}
                for max_tokens in (room, None):  # exactly the room left, then omitted
                    r = await http.post(COMPLETIONS, json={**body, "max_tokens": max_tokens})
                    assert r.status_code == 200, (max_tokens, r.text)
                    out = r.json()
                    assert out["usage"]["completion_tokens"] == room, (max_tokens, out["usage"])
                    assert out["choices"][0]["finish_reason"] == "length", out["choices"]
                r = await http.post(COMPLETIONS, json={**body, "max_tokens": room + 1})
                assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
            await server.wait_idle()

    asyncio.run(run())


@pytest.mark.parametrize("bad", [{"max_request_body_bytes": 0}, {"max_n": -1}, {"request_read_timeout_s": 0},
                                 {"timeout_keep_alive_s": float("inf")}, {"limit_concurrency": True}])
def test_server_limits_validated(bad):
    from meshlm.server.limits import ServerLimits
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        ServerLimits(**bad)
