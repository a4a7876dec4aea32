"""n > 1 forks and beam search on a GPU (Triton attention, decode CUDA graphs, copy-on-write of KV
blocks between graph replays): seeded samples equal separate requests, and beams equal
transformers' on the default model in fp32."""
from __future__ import annotations

import pytest
import torch

from meshlm import LLM, BeamSearchParams, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

QUESTIONS = ("What is the capital of France?", "What is 2+2?", "Say hello.")
WIDTH, MAX_TOKENS = 4, 16


@pytest.fixture(scope="module")
def llm(default_model_dir):
    with LLM(str(default_model_dir), device="cuda", dtype="float32", block_size=16, max_model_len=512, num_kv_blocks=512) as engine:
        yield engine


def test_forked_samples_equal_separate_requests_on_gpu(llm):
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    forked = llm.generate(prompt, SamplingParams(n=4, temperature=0.9, seed=5, max_tokens=24, ignore_eos=True))
    separate = [llm.generate(prompt, SamplingParams(temperature=0.9, seed=5 + i, max_tokens=24, ignore_eos=True))
                for i in range(4)]
    assert [c.token_ids for c in forked[0].outputs] == [s[0].outputs[0].token_ids for s in separate]
    assert llm.local_model_runner().graph_runner is not None
    assert llm.engine_core.kv.num_free_blocks == llm.engine_core.num_kv_blocks


def test_beams_match_transformers_on_gpu(llm, default_model_dir):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).cuda()
    eos = sorted(llm.engine_core.eos_token_ids)[0]
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    outputs = llm.beam_search(prompts, BeamSearchParams(WIDTH, MAX_TOKENS))
    for prompt, output in zip(prompts, outputs):
        hf = model.generate(torch.tensor([prompt], device="cuda"), num_beams=WIDTH, num_return_sequences=WIDTH,
                            do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=eos, pad_token_id=eos)
        want = []
        for seq in hf.tolist():
            generated = seq[len(prompt):]
            want.append(generated[:generated.index(eos) + 1] if eos in generated else generated)
        assert [s.tokens[len(prompt):] for s in output.sequences] == want
    assert llm.engine_core.kv.num_free_blocks == llm.engine_core.num_kv_blocks
