"""Structured outputs on a GPU: the bitmask applied on the device, and the default model with CUDA
graphs and the overlapped loop, where a constrained request makes its step wait for the previous
step's tokens.

    python3 -m pytest -q tests/gpu/test_structured_outputs_gpu.py
"""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from meshlm.executor.grammar import apply_bitmask, bitmask_words

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}


def test_bitmask_on_the_device_matches_the_host():
    vocab, rng = 49152, np.random.default_rng(1)
    bitmask = rng.integers(-2**31, 2**31, size=(5, bitmask_words(vocab)), dtype=np.int64).astype(np.int32)
    logits = torch.randn(8, vocab)
    rows = torch.tensor([0, 3, 4, 6, 7])
    on_host = apply_bitmask(logits, rows, torch.from_numpy(bitmask))
    on_device = apply_bitmask(logits.cuda(), rows.cuda(), torch.from_numpy(bitmask).cuda())
    assert torch.equal(on_device.cpu(), on_host)


def test_default_model_json_regex_choice_with_graphs(default_model_dir):
    from meshlm import LLM, SamplingParams
    llm = LLM(str(default_model_dir), max_model_len=1024)  # default model, CUDA graphs, overlapped loop
    try:
        cases = [("Describe a person as JSON.", {"json": PERSON}), ("Write a phone number.", {"regex": r"\d{3}-\d{4}"}),
                 ("Is the sky blue?", {"choice": ["yes", "no"]})]
        prompts = [[{"role": "user", "content": c[0]}] for c in cases for _ in range(8)]
        params = [SamplingParams(temperature=t, seed=i, max_tokens=64, structured_outputs=c[1])
                  for c in cases for i, t in enumerate([0.0] + [1.0] * 7)]
        free = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.chat(prompts + [[{"role": "user", "content": "Hi"}]] * 8, params + [free] * 8)
        elapsed = time.perf_counter() - start
    finally:
        llm.shutdown()
    for out, prompt_params in zip(outs, params):
        text, spec = out.outputs[0].text, prompt_params.structured_outputs
        assert out.outputs[0].finish_reason == "stop", text
        if spec.kind == "json":
            value = json.loads(text)
            assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120, value
        elif spec.kind == "regex":
            assert re.fullmatch(r"\d{3}-\d{4}", text), text
        else:
            assert text in ("yes", "no"), text
    print(f"32 requests (24 constrained) in {elapsed:.2f} s")
