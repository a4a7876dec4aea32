"""Requests that reach a limit end with finish_reason "length" and come back to the caller."""
from __future__ import annotations

import pytest

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("m"), "llama")


def test_a_pool_of_exactly_max_model_len_serves_a_request_to_its_end(model_dir):
    # 4 blocks of 4 tokens hold one request of max_model_len=16: a 10-token prompt grows to 16
    # tokens, never to 10 + 40, and every block comes back.
    llm = LLM(str(model_dir), num_kv_blocks=4, block_size=4, max_model_len=16, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (out,) = llm.generate([list(range(10, 20))], params)
    completion = out.outputs[0]
    assert out.finished and completion.finish_reason == "length"
    assert len(completion.token_ids) == 16 - 10
    assert llm.engine_core.kv_cache_usage == 0.0
    llm.shutdown()


def test_a_pool_smaller_than_max_model_len_refuses_to_start(model_dir):
    # 4 blocks of 16 tokens = 64 tokens cannot hold a request of 128: no silent truncation.
    with pytest.raises(ValueError) as err:
        LLM(str(model_dir), num_kv_blocks=4, block_size=16, max_model_len=128)
    message = str(err.value)
    for part in ("4 blocks of 16 tokens = 64 tokens", "max_model_len=128 (8 blocks)",
                 "lower max_model_len to at most 64", "raise num_kv_blocks (now 4) to at least 8"):
        assert part in message, message


def test_a_cpu_pool_too_small_for_max_model_len_names_cpu_kv_cache_gb(model_dir):
    # One block of this model: 3 layers x 2 (K, V) x 2 KV heads x 16 dims x 4 bytes x 16 tokens.
    bytes_per_block = 3 * 2 * 2 * 16 * 4 * 16
    gb = 8 * bytes_per_block / 2**30  # 8 blocks = 128 tokens
    with pytest.raises(ValueError) as err:
        LLM(str(model_dir), cpu_kv_cache_gb=gb, block_size=16, max_model_len=512, device="cpu")
    message = str(err.value)
    assert "8 blocks of 16 tokens = 128 tokens" in message and "max_model_len=512" in message, message
    assert f"raise cpu_kv_cache_gb (now {gb})" in message, message


def test_generation_stops_at_the_context_length(model_dir):
    llm = LLM(str(model_dir), max_model_len=16, num_kv_blocks=64, block_size=4)
    (out,) = llm.generate([list(range(10, 20))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 16
    llm.shutdown()
