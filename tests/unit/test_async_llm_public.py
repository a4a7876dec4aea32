"""The public ``meshlm.AsyncLLM``: built from LLM's arguments, equal to ``LLM.generate``, cumulative
or delta outputs, ``await abort`` freeing the request's KV blocks, concurrent generators interleaving."""
from __future__ import annotations

import asyncio
import time

import pytest

from meshlm import AsyncLLM, EngineArgs, LLM, SamplingParams
from tests.model_factory import make_random_model

PROMPTS = [[5, 17, 42, 9], [7, 7, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
ENGINE = dict(device="cpu", num_kv_blocks=64, max_model_len=256, enable_cuda_graphs=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("async-llm") / "m", "llama", num_hidden_layers=2, seed=11)


@pytest.fixture(scope="module")
def reference(model_dir):
    """LLM.generate's outputs: greedy, and seeded sampling."""
    with LLM(model=str(model_dir), **ENGINE) as llm:
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1))
        seeded = llm.generate(PROMPTS, SamplingParams(temperature=1, seed=5, max_tokens=12, ignore_eos=True))
    return greedy, seeded


async def _last(llm: AsyncLLM, prompt, params, request_id: str):
    out = None
    async for out in llm.generate(prompt, params, request_id=request_id):
        pass
    return out


def test_async_generate_equals_llm_generate(model_dir, reference):
    greedy, seeded = reference

    async def run():
        async with AsyncLLM(model=str(model_dir), **ENGINE) as llm:
            params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
            got = await asyncio.gather(*[_last(llm, p, params, f"g{i}") for i, p in enumerate(PROMPTS)])
            sampled = SamplingParams(temperature=1, seed=5, max_tokens=12, ignore_eos=True)
            got_seeded = await asyncio.gather(*[_last(llm, p, sampled, f"s{i}") for i, p in enumerate(PROMPTS)])
        return got, got_seeded

    got, got_seeded = asyncio.run(run())
    for ref, out in zip(greedy, got):
        assert out.finished and out.outputs[0].token_ids == ref.outputs[0].token_ids
        pairs = [(t, lp) for entry in out.outputs[0].logprobs for t, lp in entry.items()]
        ref_pairs = [(t, lp) for entry in ref.outputs[0].logprobs for t, lp in entry.items()]
        assert [t for t, _ in pairs] == [t for t, _ in ref_pairs]
        assert [lp for _, lp in pairs] == pytest.approx([lp for _, lp in ref_pairs], abs=1e-5)
    assert [o.outputs[0].token_ids for o in got_seeded] == [o.outputs[0].token_ids for o in seeded]


def test_from_engine_args_deltas_add_up_to_the_cumulative_output(model_dir, reference):
    greedy, _ = reference
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run():
        llm = AsyncLLM.from_engine_args(EngineArgs(model=str(model_dir), **ENGINE))
        try:
            deltas = [d async for d in llm.generate(PROMPTS[0], params, request_id="d", output_kind="delta")]
            wholes = [w async for w in llm.generate(PROMPTS[0], params, request_id="w")]
        finally:
            llm.shutdown()
        return deltas, wholes

    deltas, wholes = asyncio.run(run())
    tokens = [t for d in deltas for t in d.outputs[0].token_ids]
    assert tokens == greedy[0].outputs[0].token_ids == wholes[-1].outputs[0].token_ids
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    lengths = [len(w.outputs[0].token_ids) for w in wholes]
    assert lengths == sorted(lengths) and lengths[-1] == 12


def test_abort_mid_stream_frees_the_request(model_dir):
    async def follow(llm: AsyncLLM, outputs: list) -> None:
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        async for out in llm.generate(PROMPTS[2], params, request_id="long"):
            outputs.append(out)
            if len(outputs) == 3:
                assert llm.engine_core.kv_cache_usage > 0
                await llm.abort("long")

    async def run():
        async with AsyncLLM(model=str(model_dir), **ENGINE) as llm:
            outputs = []
            await asyncio.wait_for(follow(llm, outputs), timeout=30)  # the stream ends after the abort
            deadline = time.monotonic() + 10
            while llm.stats()["kv_cache_usage"] > 0 or llm.stats()["num_running"] > 0:
                assert time.monotonic() < deadline, llm.stats()
                await asyncio.sleep(0.01)
            return outputs

    outputs = asyncio.run(run())
    last = outputs[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert len(last.outputs[0].token_ids) < 200


def test_two_concurrent_generators_interleave(model_dir):
    events: list[str] = []

    async def follow(llm: AsyncLLM, name: str, prompt) -> None:
        async for _ in llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                    request_id=name):
            events.append(name)

    async def run():
        async with AsyncLLM(model=str(model_dir), **ENGINE) as llm:
            await asyncio.gather(follow(llm, "a", PROMPTS[0]), follow(llm, "b", PROMPTS[1]))

    asyncio.run(run())
    assert events.count("a") >= 2 and events.count("b") >= 2, events
    # Each one got outputs before the other had finished: they ran side by side, step by step.
    last_a, last_b = len(events) - 1 - events[::-1].index("a"), len(events) - 1 - events[::-1].index("b")
    assert events.index("b") < last_a and events.index("a") < last_b, events
