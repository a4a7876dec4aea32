"""Streaming from `meshlm serve` with the official `openai` client: tokens as they are generated,
a final usage chunk, and many concurrent streams with AsyncOpenAI.

Start the server (default model; add --tp 3 for three ranks under mpiexec):
    meshlm serve --port 8000
then run:
    python examples/openai_streaming.py
"""
import asyncio
import time

from openai import AsyncOpenAI, OpenAI

BASE_URL = "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=BASE_URL, api_key="unused")  # the key matters with --api-key
model = client.models.list().data[0].id

# Chat, streamed: print each delta as it arrives; the last chunk has no choices, only usage.
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    max_tokens=64, temperature=0.7, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print(f"\n[usage] {chunk.usage}")

# Completions, streamed; leaving the loop early closes the stream, and the server frees its KV cache.
stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=200, stream=True)
for i, chunk in enumerate(stream):
    print(chunk.choices[0].text, end="", flush=True)
    if i == 20:
        stream.close()
        print(" [stopped early]")
        break


# Many streams at once: the server batches them together in every step.
async def one(aclient: AsyncOpenAI, topic: str) -> str:
    stream = await aclient.completions.create(model=model, prompt=f"A fact about {topic}:", max_tokens=24,
                                              temperature=0, stream=True)
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


async def many() -> None:
    topics = ["cats", "the moon", "Paris", "rivers", "bees", "glass", "chess", "rain"] * 2
    async with AsyncOpenAI(base_url=BASE_URL, api_key="unused") as aclient:
        start = time.perf_counter()
        texts = await asyncio.gather(*(one(aclient, t) for t in topics))
    print(f"\n{len(texts)} concurrent streams in {time.perf_counter() - start:.1f} s")
    for topic, text in list(zip(topics, texts))[:4]:
        print(f"  {topic}: {text.strip()!r}")


asyncio.run(many())
