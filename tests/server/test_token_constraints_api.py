"""logit_bias (OpenAI), allowed_token_ids and bad_words (vLLM's extras) through the HTTP API."""
from __future__ import annotations

import asyncio

from tests.server.harness import InProcessServer

COMPLETIONS = "/v1/completions"


def test_logit_bias_allowed_token_ids_and_bad_words(model_dir):
    async def run():
        with InProcessServer(model_dir) as server:
            tokenizer = server.served.tokenizer
            text = {t: tokenizer.decode([t]) for t in (17, 20, 21)}

            async def tokens(**fields) -> list[str]:
                body = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                        "logprobs": 0, **fields}
                r = await http.post(COMPLETIONS, json=body)
                assert r.status_code == 200, (fields, r.text)
                return r.json()["choices"][0]["logprobs"]["tokens"]

            async with server.client() as http:
                assert await tokens(logit_bias={"17": 100}) == [text[17]] * 6
                allowed = await tokens(allowed_token_ids=[20, 21])
                assert set(allowed) <= {text[20], text[21]} and len(allowed) == 6, allowed
                banned = await tokens(logit_bias={"17": 100}, bad_words=[text[17].strip()])
                assert text[17] not in banned and len(banned) == 6, banned
                for bad, param in [({"logit_bias": {"17": 101}}, "logit_bias"),
                                   ({"allowed_token_ids": []}, "allowed_token_ids"),
                                   ({"bad_words": [""]}, "bad_words")]:
                    r = await http.post(COMPLETIONS, json={"prompt": [5], **bad})
                    assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
            await server.wait_idle()

    asyncio.run(run())
