"""The official openai client against the API's extras: prompt logprobs (``echo`` with ``logprobs``,
OpenAI's legacy completions, and vLLM's ``prompt_logprobs``) against transformers' logits, and the
errors OpenAI and vLLM give (unknown model, prompt plus max_tokens past the context, token ids
outside the vocabulary)."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

from tests.server.harness import InProcessServer  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10]
TOP = 2


@pytest.fixture(scope="module")
def hf_logprobs(model_dir) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


def _client(server: InProcessServer) -> "openai.AsyncOpenAI":
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://server")
    return openai.AsyncOpenAI(base_url="http://server/v1", api_key="unused", http_client=http, max_retries=0)


def test_echo_with_logprobs_and_prompt_logprobs(model_dir, hf_logprobs):
    async def run():
        with InProcessServer(model_dir) as server:
            client = _client(server)
            tokenizer = server.served.tokenizer
            out = await client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=3, temperature=0,
                                                  echo=True, logprobs=TOP, extra_body={"ignore_eos": True})
            choice = out.choices[0]
            lp = choice.logprobs
            assert choice.text.startswith(tokenizer.decode(PROMPT))
            assert len(lp.tokens) == len(PROMPT) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert lp.tokens[:len(PROMPT)] == [tokenizer.decode([t]) for t in PROMPT]
            for pos in range(1, len(PROMPT)):
                assert lp.token_logprobs[pos] == pytest.approx(float(hf_logprobs[pos - 1, PROMPT[pos]]), abs=2e-4)
            assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

            streamed = client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=3, temperature=0,
                                                 echo=True, logprobs=TOP, stream=True, extra_body={"ignore_eos": True})
            tokens, logprobs = [], []
            async for chunk in await streamed:
                if chunk.choices and chunk.choices[0].logprobs is not None:
                    tokens += chunk.choices[0].logprobs.tokens
                    logprobs += chunk.choices[0].logprobs.token_logprobs
            assert tokens == lp.tokens and logprobs == pytest.approx(lp.token_logprobs, abs=1e-6)

            vllm = await client.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=1,
                                                   extra_body={"prompt_logprobs": TOP})
            scores = vllm.choices[0].model_extra["prompt_logprobs"]
            assert scores[0] is None and len(scores) == len(PROMPT)
            for pos in range(1, len(PROMPT)):
                entry = scores[pos][str(PROMPT[pos])]
                assert entry["logprob"] == pytest.approx(float(hf_logprobs[pos - 1, PROMPT[pos]]), abs=2e-4)
                best = int(hf_logprobs[pos - 1].argmax())
                assert scores[pos][str(best)]["rank"] == 1

            chat = await client.chat.completions.create(model=model_dir.name, max_tokens=1,
                                                        messages=[{"role": "user", "content": "w5 w6"}],
                                                        extra_body={"prompt_logprobs": 0})
            chat_scores = chat.model_extra["prompt_logprobs"]
            assert chat_scores[0] is None and all(len(e) == 1 for e in chat_scores[1:])
            await server.wait_idle()

    asyncio.run(run())


def test_token_ids_outside_the_vocabulary_are_refused(model_dir):
    async def run():
        with InProcessServer(model_dir) as server:
            vocab = server.coordinator.vocab_size
            async with server.client() as http:
                for field, value in [("logit_bias", {str(vocab): 5}), ("allowed_token_ids", [1, vocab + 3])]:
                    r = await http.post("/v1/completions", json={"prompt": [5], "max_tokens": 1, field: value})
                    error = r.json()["error"]
                    assert r.status_code == 400 and error["param"] == field, r.text
                    assert str(vocab) in error["message"], error
            await server.wait_idle()

    asyncio.run(run())


def test_errors_as_openai_and_vllm_give_them(model_dir):
    async def run():
        with InProcessServer(model_dir) as server:
            client = _client(server)
            with pytest.raises(openai.NotFoundError) as missing:
                await client.completions.create(model="no-such-model", prompt=[5], max_tokens=1)
            assert missing.value.code == "model_not_found" and "no-such-model" in missing.value.message
            prompt = list(range(3, 93))  # 90 tokens; the context holds MAX_MODEL_LEN
            limit = server.served.max_model_len
            with pytest.raises(openai.BadRequestError) as too_long:
                await client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=limit)
            message = too_long.value.message
            assert str(len(prompt)) in message and str(limit) in message and str(len(prompt) + limit) in message
            omitted = await client.chat.completions.create(model=model_dir.name, temperature=0,
                                                           messages=[{"role": "user", "content": "w5"}],
                                                           extra_body={"ignore_eos": True, "min_tokens": 1})
            assert omitted.choices[0].finish_reason == "length"  # max_tokens omitted: up to the context
            await server.wait_idle()

    asyncio.run(run())
