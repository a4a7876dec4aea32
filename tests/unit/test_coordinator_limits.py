"""Requests that reach a limit end with finish_reason "length" and come back to the caller."""
from __future__ import annotations

import pytest

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("m"), "llama")


def test_generation_that_outgrows_the_kv_pool_finishes_with_length(model_dir):
    # 4 blocks of 4 tokens: a 10-token prompt can grow to 16 tokens, never to 10 + 40.
    llm = LLM(str(model_dir), num_kv_blocks=4, block_size=4, max_model_len=256, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (out,) = llm.generate([list(range(10, 20))], params)
    completion = out.outputs[0]
    assert out.finished and completion.finish_reason == "length"
    # 16 slots hold the prompt and 6 outputs; the 7th output is sampled from the 16th slot and
    # would need a 17th to go on.
    assert len(completion.token_ids) == 16 - 10 + 1
    assert llm._coordinator.kv.num_free_blocks == 4
    llm.shutdown()


def test_generation_stops_at_the_context_length(model_dir):
    llm = LLM(str(model_dir), max_model_len=16, num_kv_blocks=64, block_size=4)
    (out,) = llm.generate([list(range(10, 20))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 16
    llm.shutdown()
