"""The engine's decode-graph branch, on the CPU: a stand-in runner that returns every row's logits
(as the captured graphs do) must give the same tokens as the eager path."""
from __future__ import annotations

import dataclasses

import numpy as np

from meshlm import LLM, SamplingParams
from tests.model_factory import make_random_model, random_prompts


class AllRowsRunner:
    """Answers decode plans with the logits of every sequence, like DecodeGraphRunner.run."""

    def __init__(self, engine):
        self.engine = engine
        self.num_replays = 0

    def can_run(self, plan) -> bool:
        return plan.num_tokens == plan.num_seqs

    def run(self, plan, prev_tokens):
        # The eager forward below fills the placeholders from the previous step's tokens itself.
        self.num_replays += 1
        every_row = dataclasses.replace(plan, sample_rows=np.arange(plan.num_seqs, dtype=np.int64))
        self.engine.graph_runner = None  # the engine's own eager path, through its public method
        try:
            return self.engine.forward_logits(every_row)
        finally:
            self.engine.graph_runner = self


def _generate(path, prompts, params, with_runner: bool):
    # A budget of 4 tokens cuts prompts into chunks of one token that do not sample yet: such
    # steps have one token per sequence (the graph branch) but not a sample in every row.
    llm = LLM(str(path), num_kv_blocks=64, block_size=4, max_model_len=256, max_num_tokens=4)
    engine = llm.local_model_runner()
    if with_runner:
        engine.graph_runner = AllRowsRunner(engine)
    outs = llm.generate(prompts, params)
    replays = engine.graph_runner.num_replays if with_runner else 0
    llm.shutdown()
    return [o.outputs[0] for o in outs], replays


def runner_saw_partial_samples(path, prompts, params) -> bool:
    """Whether some plan the stand-in answered had rows that do not sample."""
    seen = []
    original = AllRowsRunner.run

    def spy(self, plan, prev_tokens):
        seen.append(len(plan.sample_rows) < plan.num_seqs)
        return original(self, plan, prev_tokens)

    AllRowsRunner.run = spy
    try:
        _generate(path, prompts, params, with_runner=True)
    finally:
        AllRowsRunner.run = original
    return any(seen)


def test_graph_branch_matches_eager(tmp_path):
    path = make_random_model(tmp_path / "m", "llama")
    # Three one-token prompts and a longer one: the first step is three whole prompts plus the
    # first token of the fourth, which does not sample yet.
    prompts = random_prompts(320, [1, 1, 1, 6], seed=3)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in (12, 5, 9, 3)]
    eager, _ = _generate(path, prompts, params, with_runner=False)
    graphed, replays = _generate(path, prompts, params, with_runner=True)
    assert replays > 0
    assert runner_saw_partial_samples(path, prompts, params)
    for e, g in zip(eager, graphed):
        assert g.token_ids == e.token_ids
        for step_e, step_g in zip(e.logprobs, g.logprobs):
            assert step_e.keys() == step_g.keys()
            assert max(abs(step_e[t] - step_g[t]) for t in step_e) < 1e-5
