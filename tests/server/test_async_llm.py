"""AsyncLLM against callers that leave at any moment: the engine loop must never fail for it.

The coordinator is the real one over a tiny model; ``GatedCoordinator`` holds a step until the test
lets it go, so "the caller left while its request was still queued" happens deterministically.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from meshlm.engine.outputs import RequestOutput
from meshlm.sampling_params import SamplingParams
from tests.server.harness import MAX_MODEL_LEN


class GatedCoordinator:
    """The real coordinator, but each step waits until ``release`` (after signalling ``in_step``)."""

    def __init__(self, inner):
        self.inner = inner
        self.in_step = threading.Event()
        self.gate = threading.Event()
        self.aborted: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self):
        self.in_step.set()
        if not self.gate.wait(timeout=30):
            raise AssertionError("the test never released the step")
        return self.inner.step()

    def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return self.inner.abort(request_id)


@pytest.fixture()
def gated(model_dir):
    from meshlm.api.async_llm import AsyncLLM
    from meshlm.api.start import start_runtime
    from meshlm.config import EngineArgs
    args = EngineArgs(model=str(model_dir), device="cpu", num_kv_blocks=32, max_model_len=MAX_MODEL_LEN)
    coordinator = GatedCoordinator(start_runtime(args))
    engine = AsyncLLM.from_engine_core(coordinator)
    yield coordinator, engine
    coordinator.gate.set()
    engine.shutdown()


def _deltas(engine, *args):
    return engine.generate(*args, output_kind="delta")


async def _drain(gen) -> list:
    """The request's outputs so far after each delta the generator yields (the last one is whole)."""
    wholes = []
    async for delta in gen:
        wholes.append(RequestOutput.accumulate(delta) if not wholes else _added(wholes[-1], delta))
    return wholes


def _added(whole: RequestOutput, delta: RequestOutput) -> RequestOutput:
    out = RequestOutput.accumulate(whole)
    out.add(delta)
    return out


async def _idle(coordinator, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while coordinator.has_unfinished() or coordinator.kv_cache_usage > 0:
        assert loop.time() < deadline, "the engine still holds requests after every caller left"
        await asyncio.sleep(0.01)


def test_caller_timing_out_while_queued_leaves_the_loop_alive(gated):
    """A caller gives up while its submit still waits in the command queue (a long step runs):
    the loop must take the command later without failing, and abort the orphaned request."""
    coordinator, engine = gated
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def scenario():
        first = asyncio.create_task(_drain(_deltas(engine, [5, 6, 7], params, "first")))
        while not coordinator.in_step.is_set():  # the loop is now inside a step, held
            await asyncio.sleep(0.005)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_drain(_deltas(engine, [8, 9], params, "left")), timeout=0.1)
        coordinator.gate.set()
        outputs = await asyncio.wait_for(first, timeout=10)
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4
        await _idle(coordinator)
        assert engine.is_healthy
        assert "left" in coordinator.aborted
        again = await asyncio.wait_for(_drain(_deltas(engine, [5, 6, 7], params)), timeout=10)
        assert again[-1].outputs[0].token_ids == outputs[-1].outputs[0].token_ids

    asyncio.run(scenario())


def test_callers_leaving_at_every_stage(gated):
    """Callers cancelled before submit is taken, while waiting for KV blocks, mid-decode and after
    finishing: every request ends, the pool empties, the loop stays healthy."""
    coordinator, engine = gated
    coordinator.gate.set()
    long = SamplingParams(max_tokens=MAX_MODEL_LEN - 8, temperature=0, ignore_eos=True)

    async def leave_after(num_outputs: int, prompt: list[int]):
        gen = _deltas(engine, prompt, long)
        seen = 0
        async for _ in gen:
            seen += 1
            if seen >= num_outputs:
                break
        await gen.aclose()

    async def scenario():
        # 32 blocks of 16 tokens: 8 requests of up to 128 tokens cannot all hold blocks at once.
        tasks = [asyncio.create_task(leave_after(1 + 7 * i, [3 + i, 4, 5])) for i in range(8)]
        tasks += [asyncio.create_task(_drain(_deltas(engine, [7, 7], long))) for _ in range(8)]
        await asyncio.sleep(0.05)
        for task in tasks[8:]:
            task.cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results), results
        await _idle(coordinator)
        assert engine.is_healthy and engine.stats()["num_running"] == 0

    asyncio.run(scenario())


def test_duplicate_request_id_is_refused_without_touching_the_owner(gated):
    coordinator, engine = gated
    coordinator.gate.set()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def scenario():
        owner = _deltas(engine, [5, 6], params, "same")
        first = await owner.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await _drain(_deltas(engine, [7, 8], params, "same"))
        rest = await _drain(owner)  # the refused caller's clean-up must not abort the owner's request
        whole = _added(first, rest[-1]) if rest else first
        assert whole.finished
        assert len(whole.outputs[0].token_ids) == 6

    asyncio.run(scenario())


def test_a_failed_step_reaches_every_caller_and_the_callback():
    """A step that raises: waiting callers get EngineDeadError, later callers too, and
    ``on_failure`` hears of it once."""
    from meshlm.api.async_llm import AsyncLLM, EngineDeadError

    class Broken:
        tokenizer = None
        max_model_len = 64

        def __init__(self):
            self.requests = []

        def submit(self, prompt, params, request_id, prompt_text=None):
            self.requests.append(request_id)
            return request_id

        def abort(self, request_id):
            return True

        def has_unfinished(self):
            return bool(self.requests)

        def has_pending_notices(self):
            return False

        def step(self):
            raise RuntimeError("device lost")

        def shutdown(self):
            raise AssertionError("a failed coordinator must not be shut down")

    failures = []
    engine = AsyncLLM.from_engine_core(Broken(), on_failure=failures.append)

    async def scenario():
        with pytest.raises(EngineDeadError, match="device lost"):
            await asyncio.wait_for(_drain(_deltas(engine, [1, 2], SamplingParams())), timeout=10)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_drain(_deltas(engine, [1, 2], SamplingParams())), timeout=10)

    asyncio.run(scenario())
    assert not engine.is_healthy
    engine.shutdown()  # joins the loop thread: the callback has run
    assert [str(f) for f in failures] == ["device lost"]
