"""L2 prefetches of the next weight (kernels/l2_prefetch.py): their settings, where a decoder layer
asks for them, and that off a capable GPU they launch nothing. The kernel itself runs in
tests/gpu/test_l2_prefetch_gpu.py."""
from __future__ import annotations

import pytest
import torch

from meshlm import LLM, SamplingParams
from meshlm.kernels import l2_prefetch
from meshlm.models import llama


@pytest.fixture(autouse=True)
def _prefetches_off_after():
    yield
    l2_prefetch.set_l2_prefetch(**{site: 0 for site in l2_prefetch.PREFETCH_SITES})


def test_bad_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match="unknown prefetch site 'o_prj'"):
        l2_prefetch.set_l2_prefetch(o_prj=1 << 20)
    with pytest.raises(ValueError, match="'down' must be non-negative"):
        l2_prefetch.set_l2_prefetch(down=-1)


def test_no_bytes_off_the_gpu_or_for_large_batches(monkeypatch):
    weight = torch.zeros(1024, 1024, dtype=torch.bfloat16)
    l2_prefetch.set_l2_prefetch(o_proj=1 << 40)
    assert l2_prefetch.prefetch_bytes("o_proj", weight, 1) == 0  # a CPU tensor
    monkeypatch.setattr(l2_prefetch, "_capable", lambda device: True)
    assert l2_prefetch.prefetch_bytes("o_proj", weight, 1) == 2 << 20  # the whole weight, no more
    assert l2_prefetch.prefetch_bytes("o_proj", weight, l2_prefetch.PREFETCH_MAX_ROWS + 1) == 0
    assert l2_prefetch.prefetch_bytes("qkv", weight, 1) == 0  # a site left off
    l2_prefetch.set_l2_prefetch(o_proj=100_000)
    assert l2_prefetch.prefetch_bytes("o_proj", weight, 1) == 6 * 16384  # whole chunks of what was asked
    assert l2_prefetch.prefetch_bytes("o_proj", weight.t(), 1) == 0  # only a contiguous weight


def test_each_layer_asks_for_its_next_weight_in_order(monkeypatch):
    calls = []
    monkeypatch.setattr(llama, "prefetch_weight", lambda site, weight, rows: calls.append((site, weight, rows)))
    llm = LLM(load_format="random", skip_tokenizer_init=True, max_model_len=64, cpu_kv_cache_gb=0.01)
    try:
        model = llm.engine_core.dispatcher.runner.model
        calls.clear()  # the warm-up's
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    finally:
        llm.shutdown()
    layers = list(model.layers.values())
    expected = []
    for i, layer in enumerate(layers):
        if i:
            expected.append(("qkv", layer.self_attn.qkv_proj.weight))
        expected += [("o_proj", layer.self_attn.o_proj.weight), ("gate_up", layer.mlp.gate_up_proj.weight),
                     ("down", layer.mlp.down_proj.weight)]
    steps = [calls[:len(expected)], calls[len(expected):]]  # the prompt's step, then one decode
    assert len(calls) == 2 * len(expected)
    for step, rows in zip(steps, (3, 1)):
        assert [site for site, _, _ in step] == [site for site, _ in expected]
        assert all(weight is want for (_, weight, _), (_, want) in zip(step, expected))
        assert {n for _, _, n in step} == {rows}
