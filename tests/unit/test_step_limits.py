"""The automatic max_num_tokens: 16384 tokens a step on GPUs of 70 GiB or more, 8192 on smaller
ones and the CPU, 8192 for the server; resolved by the runtime (smallest over ranks) and the plan."""
from __future__ import annotations

import types

import pytest
import torch

from meshlm import LLM
from meshlm.api import build
from meshlm.api.plan import plan_layout
from meshlm.config import EngineArgs, EngineConfig, SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager
from meshlm.engine.scheduler import Scheduler
from meshlm.server.launch import with_server_defaults
from meshlm.step_limits import auto_max_num_tokens

GiB = 2**30


@pytest.mark.parametrize("memory,tokens", [(None, 8192), (24 * GiB, 8192), (70 * GiB - 1, 8192),
                                           (70 * GiB, 16384), (80 * GiB, 16384), (141 * GiB, 16384)])
def test_the_card_sets_the_step(memory, tokens):
    assert auto_max_num_tokens(memory) == tokens


def test_unset_until_the_runtime_resolves_it():
    assert EngineArgs().max_num_tokens is None and SchedulerConfig().max_num_tokens is None
    with pytest.raises(ValueError, match="max_num_tokens=None"):
        Scheduler(SchedulerConfig(), KVCacheManager(8, 4))


def test_the_runtime_resolves_it_from_its_card(monkeypatch):
    config = EngineConfig.from_args(EngineArgs(load_format="random", skip_tokenizer_init=True))
    cards = {80 * GiB: 16384, 40 * GiB: 8192}
    for memory, tokens in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, m=memory: types.SimpleNamespace(
            total_memory=m))
        resolved = build._with_max_num_tokens(config, torch.device("cuda", 0), None)
        assert resolved.scheduler.max_num_tokens == tokens
    assert build._with_max_num_tokens(config, torch.device("cpu"), None).scheduler.max_num_tokens == 8192
    chosen = EngineConfig.from_args(EngineArgs(load_format="random", max_num_tokens=300))
    assert build._with_max_num_tokens(chosen, torch.device("cuda", 0), None).scheduler.max_num_tokens == 300


def test_an_engine_on_the_cpu_steps_8192_tokens():
    llm = LLM(load_format="random", skip_tokenizer_init=True, max_model_len=64, cpu_kv_cache_gb=0.01)
    try:
        assert llm.engine_core.max_num_tokens == 8192
        assert llm.engine_core.scheduler.config.max_num_tokens == 8192
    finally:
        llm.shutdown()


def test_the_server_keeps_8192_unless_told():
    assert with_server_defaults(EngineArgs()).max_num_tokens == 8192
    assert with_server_defaults(EngineArgs(max_num_tokens=20000)).max_num_tokens == 20000


@pytest.mark.parametrize("gib,tokens", [(24, 8192), (141, 16384)])
def test_the_plan_resolves_it_as_the_engine(gib, tokens):
    plan = plan_layout(EngineArgs(), gib * GiB)
    assert plan.max_num_tokens == tokens
    assert plan_layout(EngineArgs(max_num_tokens=4096), gib * GiB).max_num_tokens == 4096
