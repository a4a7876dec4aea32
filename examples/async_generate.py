"""Two prompts generated concurrently with the asyncio API, streaming, one of them aborted.

    python examples/async_generate.py                      (one rank)
    python examples/async_generate.py --tp 3               (starts 3 ranks under mpiexec itself)
    mpiexec -n 3 python examples/async_generate.py --tp 3  (or start them yourself; rank 0 prints)
"""
from __future__ import annotations

import argparse
import asyncio

from meshlm import AsyncLLM, SamplingParams


async def stream(llm: AsyncLLM, name: str, prompt: str, stop_after: int | None = None) -> None:
    params = SamplingParams(temperature=0.7, seed=1, max_tokens=48, prompt_logprobs=1)
    num_deltas = 0
    async for delta in llm.generate(prompt, params, request_id=name, output_kind="delta"):
        if delta.prompt_logprobs is not None:
            scores = [e[t] for t, e in zip(delta.prompt_token_ids[1:], delta.prompt_logprobs[1:])]
            print(f"[{name}] prompt logprob per token: {sum(scores) / len(scores):.3f}")
        print(f"[{name}] {delta.outputs[0].text!r}")
        num_deltas += 1
        if stop_after is not None and num_deltas == stop_after:
            await llm.abort(name)  # the stream then ends with finish_reason "abort"
    print(f"[{name}] finished: {delta.outputs[0].finish_reason}")


async def main(tp: int) -> None:
    async with AsyncLLM(tensor_parallel_size=tp) as llm:  # the default model
        await asyncio.gather(stream(llm, "story", "Once upon a time"),
                             stream(llm, "recipe", "To bake bread, first", stop_after=5))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    asyncio.run(main(parser.parse_args().tp))
