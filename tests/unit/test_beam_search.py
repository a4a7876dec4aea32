"""Beam search against transformers' ``generate(num_beams=..., do_sample=False)`` on the same weights
(fp32): a tiny random model with a small vocabulary, so that eos ends some hypotheses, then the
default model, whose answers end in eos (there early_stopping changes the beams). Beams share KV
blocks copy-on-write, survive preemption, and every block comes back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from meshlm import LLM, BeamSearchParams, SamplingParams
from meshlm.engine.kv_cache import num_blocks_for
from tests.model_factory import load_reference, make_random_model
from tests.preemptions import record_preemptions

pytestmark = pytest.mark.timeout(300)

VOCAB_SIZE = 16  # eos (id 2) is one token in 16: some hypotheses end with it
EOS = 2
WIDTH = 4
MAX_TOKENS = 10
BLOCK_SIZE = 4
ENGINE = dict(num_kv_blocks=256, block_size=BLOCK_SIZE, max_model_len=128)
TINY_POOL = dict(num_kv_blocks=24, block_size=BLOCK_SIZE, max_model_len=64, max_num_tokens=16)
SETTINGS = [(False, 1.0), (True, 1.0), ("never", 2.0), (False, -1.0)]  # (early_stopping, length_penalty)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """torch's intra-op threads spin against each other on a loaded 2-core machine: use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=7, vocab_size=VOCAB_SIZE))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(3, VOCAB_SIZE, size=n).tolist() for n in (5, 9, 14)]


def hf_beams(model, prompt: list[int], early_stopping, length_penalty: float, max_tokens: int = MAX_TOKENS,
             eos: int = EOS) -> list[tuple[list[int], float]]:
    """transformers' returned beams: (generated token ids up to and with eos, score), best first."""
    out = model.generate(torch.tensor([prompt]), num_beams=WIDTH, num_return_sequences=WIDTH, do_sample=False,
                         max_new_tokens=max_tokens, early_stopping=early_stopping, length_penalty=length_penalty,
                         eos_token_id=eos, pad_token_id=eos, output_scores=True, return_dict_in_generate=True)
    beams = []
    for seq, score in zip(out.sequences.tolist(), out.sequences_scores.tolist()):
        generated = seq[len(prompt):]
        if eos in generated:  # padding after an eos is eos too
            generated = generated[:generated.index(eos) + 1]
        beams.append((generated, score))
    return beams


def meshlm_beams(output, prompt: list[int], length_penalty: float) -> list[tuple[list[int], float]]:
    """(generated token ids, score) of each returned beam; the score as transformers defines it."""
    assert all(s.tokens[:len(prompt)] == prompt for s in output.sequences)
    generated = [s.tokens[len(prompt):] for s in output.sequences]
    return [(g, s.cum_logprob / len(g) ** length_penalty) for g, s in zip(generated, output.sequences)]


def assert_same_beams(got: list[tuple[list[int], float]], want: list[tuple[list[int], float]], where: str) -> None:
    assert [g for g, _ in got] == [w for w, _ in want], where
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4, atol=1e-4, err_msg=where)


@pytest.fixture(scope="module")
def llm(model_path):
    with LLM(model_path, **ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(model_path):
    return load_reference(model_path)


@pytest.mark.parametrize("early_stopping, length_penalty", SETTINGS)
def test_beams_match_transformers(llm, reference, prompts, early_stopping, length_penalty):
    params = BeamSearchParams(WIDTH, MAX_TOKENS, length_penalty=length_penalty, early_stopping=early_stopping)
    outputs = llm.beam_search(prompts, params)
    assert llm.engine_core.kv.num_free_blocks == llm.engine_core.num_kv_blocks  # no block leaked
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        want = hf_beams(reference, prompt, early_stopping, length_penalty)
        assert_same_beams(meshlm_beams(output, prompt, length_penalty), want,
                          f"prompt {i}, early_stopping={early_stopping}, length_penalty={length_penalty}")


def test_some_hypotheses_end_with_eos(llm, prompts):
    """The settings above are only exercised when eos ends hypotheses before max_tokens."""
    outputs = llm.beam_search(prompts, BeamSearchParams(WIDTH, MAX_TOKENS))
    reasons = [s.finish_reason for o in outputs for s in o.sequences]
    assert "stop" in reasons and "length" in reasons, reasons
    for o in outputs:
        for s in o.sequences:
            assert (s.tokens[-1] == EOS) == (s.finish_reason == "stop")


def test_beams_share_blocks_and_fork_copy_on_write(llm, prompts):
    core = llm.engine_core
    schedule, planned = core.scheduler.schedule, []

    def recording_schedule():  # (blocks in use, copy-on-write pairs) as each step is planned
        out = schedule()
        planned.append((core.num_kv_blocks - core.kv.num_free_blocks, len(out.block_copies)))
        return out

    core.scheduler.schedule = recording_schedule
    prompt = prompts[1]  # 9 tokens: two full blocks and one partial
    try:
        request_id = core.submit(prompt, BeamSearchParams(WIDTH, MAX_TOKENS, ignore_eos=True).to_sampling_params())
        outputs = []
        while core.has_unfinished():
            outputs += core.step()
        core.step()  # the ranks hear of the finished beams
    finally:
        core.scheduler.schedule = schedule
    prompt_blocks = num_blocks_for(len(prompt), BLOCK_SIZE)
    # The prefill, then WIDTH beams forked from it, each writing token 9 into the shared partial
    # block: all but the last holder copy it (not WIDTH x prompt_blocks).
    assert planned[:2] == [(prompt_blocks, 0), (prompt_blocks + WIDTH - 1, WIDTH - 1)]
    assert max(used for used, _ in planned) < WIDTH * num_blocks_for(len(prompt) + MAX_TOKENS, BLOCK_SIZE)
    assert [o.request_id for o in outputs if o.finished] == [request_id]
    assert len(outputs[-1].outputs) == WIDTH
    assert core.kv.num_free_blocks == core.num_kv_blocks
    assert llm.local_model_runner().sampler.num_requests == 0


def test_tiny_pool_preempts_beams_and_gives_the_same_beams(model_path, llm, prompts):
    params = BeamSearchParams(WIDTH, MAX_TOKENS, ignore_eos=True)
    want = [[s.tokens for s in o.sequences] for o in llm.beam_search(prompts, params)]
    with LLM(model_path, **TINY_POOL) as small:
        core = small.engine_core
        preempted = record_preemptions(core)
        got = [[s.tokens for s in o.sequences] for o in small.beam_search(prompts, params)]
        assert core.kv.num_free_blocks == core.num_kv_blocks
    assert preempted, "no beam was preempted"
    assert got == want


def test_n_best_of_a_wider_search_and_plain_requests_beside_it(llm, prompts):
    """n=2 of width 4 are the search's two best; a sampled request in the same batch is unchanged."""
    beams = llm.beam_search(prompts[:1], BeamSearchParams(WIDTH, MAX_TOKENS))[0]
    plain = SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True)
    alone = llm.generate(prompts[2], plain)[0].outputs[0].token_ids
    search = SamplingParams(n=2, best_of=WIDTH, use_beam_search=True, max_tokens=MAX_TOKENS)
    mixed = llm.generate([prompts[0], prompts[2]], [search, plain])
    assert [c.token_ids for c in mixed[0].outputs] == [s.tokens[len(prompts[0]):] for s in beams.sequences[:2]]
    assert mixed[1].outputs[0].token_ids == alone
    assert llm.engine_core.kv.num_free_blocks == llm.engine_core.num_kv_blocks


# ---- the default model ----------------------------------------------------------------------------

QUESTIONS = ("What is the capital of France?", "What is 2+2?")
DEFAULT_MAX_TOKENS = 16
# On the first question, four hypotheses end in eos before max_tokens: early_stopping=True then
# stops where False searches on, and the beams differ.
DEFAULT_SETTINGS = [(False, 1.0), (True, 1.0), ("never", 2.0)]


@pytest.fixture(scope="module")
def default_llm():
    with LLM(num_kv_blocks=128, max_model_len=256) as engine:
        yield engine


@pytest.fixture(scope="module")
def default_reference():
    from meshlm.weights.default_model import ensure_default_model
    return transformers.AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32).eval()


def test_default_model_beams_match_transformers(default_llm, default_reference):
    eos = sorted(default_llm.engine_core.eos_token_ids)
    prompts = [default_llm.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    first_beams = {}
    for early_stopping, length_penalty in DEFAULT_SETTINGS:
        params = BeamSearchParams(WIDTH, DEFAULT_MAX_TOKENS, length_penalty=length_penalty,
                                  early_stopping=early_stopping)
        outputs = default_llm.beam_search(prompts, params)
        assert default_llm.engine_core.kv.num_free_blocks == default_llm.engine_core.num_kv_blocks
        for question, prompt, output in zip(QUESTIONS, prompts, outputs):
            want = hf_beams(default_reference, prompt, early_stopping, length_penalty, DEFAULT_MAX_TOKENS, eos[0])
            assert_same_beams(meshlm_beams(output, prompt, length_penalty), want, f"{question!r}, "
                              f"early_stopping={early_stopping}, length_penalty={length_penalty}")
            assert output.sequences[0].text == default_llm.tokenizer.decode(
                [t for t in output.sequences[0].tokens[len(prompt):] if t not in eos])
        first_beams[early_stopping] = [s.tokens for s in outputs[0].sequences]
        assert "Paris" in outputs[0].sequences[0].text
    assert first_beams[True] != first_beams[False]  # early stopping had something to decide


def test_abort_mid_search_frees_every_beam(llm, prompts):
    core = llm.engine_core
    request_id = core.submit(prompts[2], BeamSearchParams(WIDTH, MAX_TOKENS, ignore_eos=True).to_sampling_params())
    for _ in range(3):
        core.step()
    assert core.kv.num_free_blocks < core.num_kv_blocks
    assert core.abort(request_id)
    core.step()  # the ranks hear of the aborted beams
    assert not core.has_unfinished()
    assert core.kv.num_free_blocks == core.num_kv_blocks
    assert llm.local_model_runner().sampler.num_requests == 0


@pytest.mark.parametrize("fields, words", [
    (dict(use_beam_search=True, n=5, best_of=4), ["best_of=4", "n=5", "10"]),
    (dict(use_beam_search=True, best_of=11), ["best_of=11", "10"]),
    (dict(n=1, best_of=2), ["best_of=2", "n=1", "use_beam_search"]),
    (dict(use_beam_search=True, early_stopping="sometimes"), ["early_stopping='sometimes'", "never"]),
])
def test_bad_beam_parameters_name_every_number(fields, words):
    with pytest.raises(ValueError) as err:
        SamplingParams(**fields)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_beam_search_params_are_vllm_s():
    params = BeamSearchParams(beam_width=3, max_tokens=7, length_penalty=0.5).to_sampling_params()
    assert (params.n, params.beam_width, params.max_tokens, params.length_penalty) == (3, 3, 7, 0.5)
    assert params.use_beam_search and SamplingParams.from_dict(params.to_dict()) == params
