"""Many concurrent streaming clients that leave at random moments (cancelled tasks, timeouts,
disconnects after a few events, slow readers): the engine loop stays healthy, every request that
was answered was answered properly, and when all have gone nothing runs, waits or holds KV blocks.
"""
from __future__ import annotations

import asyncio
import json
import random

from tests.server.harness import InProcessServer, asgi_call, check_answer

NUM_CLIENTS = 200


def _body(rng: random.Random) -> dict:
    words = " ".join(f"w{rng.randint(3, 300)}" for _ in range(rng.randint(1, 60)))
    body = {"max_tokens": rng.choice([4, 16, None]), "ignore_eos": True, "stream": True,
            "temperature": rng.choice([0, 1.0]), "n": rng.choice([1, 1, 2])}
    if rng.random() < 0.5:
        return {**body, "prompt": rng.choice([words, [words, words]])}
    return {**body, "messages": [{"role": "user", "content": words}]}


def _path(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


async def _disconnecting_client(server, rng: random.Random, body: dict) -> None:
    """A client that reads a few events and closes the stream (``http.disconnect``)."""
    status, chunks = await asgi_call(server.app, "POST", _path(body), json.dumps(body).encode(),
                                     leave_after_chunks=rng.randint(1, 6))
    assert status == 200, (status, chunks[:2])
    assert all(c.startswith(b"data: ") for c in chunks), chunks[:3]


async def _giving_up_client(http, rng: random.Random, body: dict) -> None:
    """A client whose task is cancelled (a timeout) while queued, prefilling or decoding."""
    try:
        r = await asyncio.wait_for(http.post(_path(body), json=body), timeout=rng.uniform(0.0, 1.5))
    except asyncio.TimeoutError:
        return
    check_answer(r.status_code, r.content, body)


async def _slow_reader(server, rng: random.Random, body: dict) -> None:
    """A client that takes its time over each event, then reads to the end."""
    status, chunks = await asgi_call(server.app, "POST", _path(body), json.dumps({**body, "max_tokens": 8}).encode(),
                                     read_delay_s=rng.uniform(0.01, 0.1))
    assert status == 200 and chunks[-1] == b"data: [DONE]\n\n", (status, chunks[-2:])


def test_clients_leaving_at_random_moments(model_dir):
    rng = random.Random(7)

    async def run():
        with InProcessServer(model_dir, num_kv_blocks=48) as server:  # too few blocks for all: some wait
            async with server.client() as http:
                clients = []
                for _ in range(NUM_CLIENTS):
                    body, kind = _body(rng), rng.random()
                    if kind < 0.45:
                        clients.append(_disconnecting_client(server, rng, body))
                    elif kind < 0.9:
                        clients.append(_giving_up_client(http, rng, body))
                    else:
                        clients.append(_slow_reader(server, rng, body))
                await asyncio.wait_for(asyncio.gather(*clients), timeout=90)
            await server.wait_idle()
            assert server.engine.is_healthy
            await server.check_serving()
            await server.wait_idle()

    asyncio.run(run())
