"""A request's greedy tokens do not depend on what else runs: the same alone as inside a busy batch
whose prompts are prefilled in chunks and whose requests are preempted (recompute) for lack of KV
blocks, with and without prefix caching."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model

VOCAB_SIZE = 320
BLOCK_SIZE = 4
MAX_NUM_TOKENS = 32
# Pool of 24 blocks = 96 token slots: the longest request (50 + 16 tokens) fits alone, 13 do not.
NUM_KV_BLOCKS = 24
PROMPT_LENGTHS = (45, 3, 17, 38, 9, 50, 26, 33, 12, 41, 7, 29, 36)
MAX_TOKENS = (16, 9, 14, 6, 12, 16, 10, 8, 15, 11, 13, 7, 12)
SHARED_PREFIX_LEN = 20  # every third prompt starts with the same 20 tokens: prefix cache hits


def make_requests(vocab_size: int, lengths=PROMPT_LENGTHS, max_tokens=MAX_TOKENS, seed: int = 5):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, vocab_size, size=SHARED_PREFIX_LEN).tolist()
    prompts = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(3, vocab_size, size=n).tolist()
        if i % 3 == 0 and n > SHARED_PREFIX_LEN:
            tokens[:SHARED_PREFIX_LEN] = prefix
        prompts.append(tokens)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    return prompts, params


@dataclass
class StepLog:
    """What the scheduler did, recorded from each SchedulerOutput of a run."""

    num_preemptions: int = 0
    num_preempted_mid_generation: int = 0  # preempted with outputs already sampled: they recompute those too
    num_partial_prefill_chunks: int = 0  # chunks that stop short of the request's known tokens
    max_step_tokens: int = 0
    preempted_ids: set[str] = field(default_factory=set)


def record_steps(llm: LLM) -> StepLog:
    """Wrap the scheduler of ``llm`` so that every step's decisions land in the returned log."""
    scheduler = llm.engine_core.scheduler
    schedule = scheduler.schedule
    log = StepLog()

    def recording_schedule():
        out = schedule()
        log.num_preemptions += len(out.preempted)
        log.num_preempted_mid_generation += sum(bool(r.output_token_ids) for r in out.preempted)
        log.preempted_ids.update(r.request_id for r in out.preempted)
        log.num_partial_prefill_chunks += sum(not c.is_sampling for c in out.chunks)
        log.max_step_tokens = max(log.max_step_tokens, out.num_tokens)
        return out

    scheduler.schedule = recording_schedule
    return log


def tokens_alone(llm: LLM, prompts, params) -> list[list[int]]:
    """Each request in a call of its own: a batch of one."""
    return [llm.generate([p], q)[0].outputs[0].token_ids for p, q in zip(prompts, params)]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=11, vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="module")
def reference_tokens(random_model):
    """Every request alone, with room to spare: one prefill, no preemption, no prefix sharing."""
    prompts, params = make_requests(VOCAB_SIZE)
    with LLM(str(random_model), num_kv_blocks=256, block_size=16, enable_prefix_caching=False) as llm:
        return tokens_alone(llm, prompts, params)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_greedy_tokens_survive_chunking_preemption_and_batching(random_model, reference_tokens,
                                                                enable_prefix_caching):
    prompts, params = make_requests(VOCAB_SIZE)
    with LLM(str(random_model), num_kv_blocks=NUM_KV_BLOCKS, block_size=BLOCK_SIZE,
             max_model_len=NUM_KV_BLOCKS * BLOCK_SIZE, max_num_tokens=MAX_NUM_TOKENS,
             enable_prefix_caching=enable_prefix_caching) as llm:
        log = record_steps(llm)
        outputs = llm.generate(prompts, params)
        assert not llm.engine_core.has_unfinished()
        assert llm.engine_core.kv_cache_usage == 0.0  # every block came back

    got = [o.outputs[0].token_ids for o in outputs]
    for i, (mine, ref) in enumerate(zip(got, reference_tokens)):
        assert mine == ref, f"request {i} (prompt of {len(prompts[i])} tokens) differs in the busy batch"
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    # The run really exercised what it claims to.
    assert log.num_preemptions > 0 and log.num_preempted_mid_generation > 0
    assert log.num_partial_prefill_chunks > 0
    assert log.max_step_tokens <= MAX_NUM_TOKENS
    cached = [o.num_cached_tokens for o in outputs]
    if enable_prefix_caching:
        assert max(cached) >= SHARED_PREFIX_LEN // BLOCK_SIZE * BLOCK_SIZE
    else:
        assert max(cached) == 0


@pytest.mark.timeout(120)
def test_default_model_greedy_tokens_survive_chunking_and_preemption():
    # 4 requests, a pool of 11 blocks of 4 tokens (one request of max_model_len=44): the busy batch
    # preempts; the 36-token prompt is prefilled in two chunks. No prefix caching, so the busy run
    # cannot reuse the solo runs' blocks.
    lengths, max_tokens = (36, 6, 20, 10), (5, 5, 4, 5)
    prompts, params = make_requests(49152, lengths, max_tokens, seed=7)
    with LLM(num_kv_blocks=11, block_size=BLOCK_SIZE, max_num_tokens=MAX_NUM_TOKENS, max_model_len=44,
             enable_prefix_caching=False) as llm:
        alone = tokens_alone(llm, prompts, params)
        log = record_steps(llm)
        busy = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert busy == alone
    assert log.num_preemptions > 0
    assert log.num_partial_prefill_chunks > 0
