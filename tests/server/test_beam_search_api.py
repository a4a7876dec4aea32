"""use_beam_search, best_of and length_penalty (vLLM's extras) on /v1/completions, through the
official openai client, against transformers' beam search on the same tiny model."""
from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

from tests.model_factory import load_reference  # noqa: E402
from tests.server.harness import InProcessServer  # noqa: E402

PROMPT = [5, 6, 7, 8, 9]
EOS = 2


def hf_texts(model_dir, num_beams: int, n: int, length_penalty: float, max_tokens: int) -> list[str]:
    model = load_reference(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = model.generate(torch.tensor([PROMPT]), num_beams=num_beams, num_return_sequences=n, do_sample=False,
                         max_new_tokens=max_tokens, length_penalty=length_penalty, eos_token_id=EOS,
                         pad_token_id=EOS)
    return [tokenizer.decode([t for t in seq[len(PROMPT):] if t != EOS], skip_special_tokens=True)
            for seq in out.tolist()]


def test_beam_search_completions_match_transformers(model_dir):
    want = hf_texts(model_dir, num_beams=4, n=2, length_penalty=0.5, max_tokens=8)

    async def run():
        with InProcessServer(model_dir) as server:
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://server/v1")
            client = openai.AsyncOpenAI(api_key="unused", base_url="http://server/v1", http_client=http,
                                        max_retries=0)
            beams = dict(use_beam_search=True, length_penalty=0.5)
            out = await client.completions.create(model=server.served.name, prompt=PROMPT, n=2, best_of=4,
                                                  max_tokens=8, temperature=0, extra_body=beams)
            assert [c.text for c in out.choices] == want
            assert [c.index for c in out.choices] == [0, 1]
            stream = await client.completions.create(model=server.served.name, prompt=PROMPT, n=2, best_of=4,
                                                     max_tokens=8, temperature=0, stream=True, extra_body=beams)
            streamed = ["", ""]
            async for chunk in stream:
                for c in chunk.choices:
                    streamed[c.index] += c.text
            assert streamed == want
            for bad in [dict(n=5, best_of=4, extra_body={"use_beam_search": True}),  # n > width
                        dict(n=1, best_of=11, extra_body={"use_beam_search": True}),  # width > 10
                        dict(n=1, best_of=2)]:  # best_of != n without beam search
                with pytest.raises(openai.BadRequestError):
                    await client.completions.create(model=server.served.name, prompt=PROMPT, max_tokens=4, **bad)
            await http.aclose()
            await server.wait_idle()

    asyncio.run(run())
