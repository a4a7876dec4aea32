"""Speculative decoding with n-gram drafts gives exactly the tokens of plain greedy decoding, in a
busy batch (chunked prefill, preemption in a tiny KV pool, prefix caching), with stop ids, stop
strings, eos and max_tokens inside accepted runs, and streaming; every KV block comes back. The
scheduler rolls a verify step's rejected drafts back (computed tokens and blocks)."""
from __future__ import annotations

import numpy as np
import pytest

from meshlm import LLM, SamplingParams
from meshlm.config import EngineArgs, SchedulerConfig
from meshlm.engine.kv_cache import KVCacheManager, num_blocks_for
from meshlm.engine.ngram_proposer import NgramProposer
from meshlm.engine.request import Request
from meshlm.engine.scheduler import Scheduler
from meshlm.protocol import StepResult
from tests.model_factory import make_random_model

pytestmark = pytest.mark.timeout(300)

VOCAB_SIZE = 320
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
ENGINE = dict(num_kv_blocks=256, block_size=4, max_model_len=160)
TINY_POOL = dict(num_kv_blocks=40, block_size=4, max_model_len=96, max_num_tokens=32)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model(tmp_path_factory.mktemp("llama"), "llama", seed=11, vocab_size=VOCAB_SIZE))


def looping_prompts(seed: int = 3) -> list[list[int]]:
    """Prompts that repeat a span, some sharing a prefix: drafts are found, some accepted."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, VOCAB_SIZE, size=10).tolist()
    prompts = []
    for i, (span, repeats) in enumerate([(6, 3), (9, 2), (4, 5), (12, 2), (5, 1), (7, 3)]):
        body = rng.integers(3, VOCAB_SIZE, size=span).tolist() * repeats
        prompts.append(shared + body if i % 2 else body)
    return prompts


def generate(model_path: str, spec: dict | None, prompts, params, **engine):
    with LLM(model_path, speculative_config=spec, **{**ENGINE, **engine}) as llm:
        outputs = llm.generate(prompts, params)
        assert llm.engine_core.kv_cache_usage == 0.0  # every block came back, rolled-back ones too
        stats = llm.engine_core.spec_decode_stats
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs], stats


@pytest.fixture(scope="module")
def plain_and_spec(model_path):
    prompts = looping_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain, _ = generate(model_path, None, prompts, params)
    return prompts, params, plain


def test_greedy_ngram_equals_plain_decoding(model_path, plain_and_spec):
    prompts, params, plain = plain_and_spec
    spec, stats = generate(model_path, NGRAM, prompts, params)
    assert spec == plain
    # The verify path ran, accepted drafts and rolled rejected ones back.
    assert stats.num_accepted_tokens > 0
    assert stats.num_draft_tokens > stats.num_accepted_tokens


def test_preemption_and_chunked_prefill_in_a_tiny_pool(model_path, plain_and_spec):
    prompts, params, plain = plain_and_spec
    spec, stats = generate(model_path, NGRAM, prompts, params, **TINY_POOL)
    assert spec == plain
    assert stats.num_draft_tokens > 0


def test_stops_inside_accepted_runs(model_path, plain_and_spec):
    """Stop ids, stop strings and max_tokens taken from the plain run's own outputs, so that they
    fall inside runs of accepted drafts; tokens after a stop are dropped."""
    prompts, _, plain = plain_and_spec
    params = []
    for i, request in enumerate(plain):
        tokens, text = request[0][0], request[0][1]
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[tokens[17]]))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0.0, max_tokens=40, stop=[text[len(text) // 2:][:3]]))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True))
    expected, _ = generate(model_path, None, prompts, params)
    spec, _ = generate(model_path, NGRAM, prompts, params)
    assert spec == expected
    assert [r[0][2] for r in spec] == ["stop", "stop", "length"] * 2


def test_streaming_deltas_add_up(model_path, plain_and_spec):
    prompts, params, plain = plain_and_spec
    with LLM(model_path, speculative_config=NGRAM, **ENGINE) as llm:
        deltas = list(llm.generate_stream(prompts[2], params, output_kind="delta"))
    assert sum((d.outputs[0].token_ids for d in deltas), []) == plain[2][0][0]
    assert max(len(d.outputs[0].token_ids) for d in deltas) > 1  # several tokens in one delta


def test_sampling_requests_and_those_without_drafts_run_beside_verify_rows(model_path):
    """Penalties and logprobs get no drafts; seeded sampling and greedy requests share steps."""
    prompts = looping_prompts(seed=5)[:4]
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.9, max_tokens=30, ignore_eos=True, seed=4),
              SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)]
    plain, _ = generate(model_path, None, prompts, params)
    spec, stats = generate(model_path, NGRAM, prompts, params)
    assert [spec[i] for i in (0, 1, 3)] == [plain[i] for i in (0, 1, 3)]
    assert len(spec[2][0][0]) == 30
    assert stats.num_draft_tokens > 0


def test_rejected_drafts_are_rolled_back():
    """A verify row of 1 + 3 tokens accepting one draft: computed tokens and blocks shrink back."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_tokens=64, max_batch_size=4), kv, NgramProposer(3, 1, 3))
    request = Request("r", [5, 6, 7, 8, 5, 6], SamplingParams(temperature=0.0, max_tokens=20))
    scheduler.add(request)
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, StepResult(np.array([7]), None, None, None))
    verify = scheduler.schedule()  # tokens 5 6 7 8 5 6 7: drafts 8 5 6 after the last 7
    chunk = verify.chunks[0]
    assert chunk.draft_token_ids == [8, 5, 6] and chunk.num_new_tokens == 4
    assert len(request.block_ids) == num_blocks_for(10, 4)
    result = StepResult(np.array([[8, 9, -1, -1]]), None, None, None, num_tokens=np.array([2]))
    scheduler.update_from_output(verify, result)
    assert request.output_token_ids == [7, 8, 9]
    assert request.num_computed_tokens == request.num_tokens - 1 == 8
    assert len(request.block_ids) == num_blocks_for(8, 4)
    assert kv.num_free_blocks == 16 - len(request.block_ids)
    assert (scheduler.spec_stats.num_draft_tokens, scheduler.spec_stats.num_accepted_tokens) == (3, 1)


def test_speculative_config_is_checked():
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="unknown"):
        EngineArgs(speculative_config={"method": "ngram", "lookahead": 2})
    with pytest.raises(ValueError, match="prompt_lookup_min=3 and prompt_lookup_max=2"):
        EngineArgs(speculative_config={"prompt_lookup_min": 3, "prompt_lookup_max": 2})
    args = EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')  # the CLI's JSON
    assert EngineArgs(speculative_config=args.speculative_config).to_cli() == args.to_cli()
    assert args.to_cli() == ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']


def test_metrics_and_bench_report_acceptance():
    from meshlm.bench.throughput import _spec_decode_summary
    from meshlm.engine.scheduler import SpecDecodeStats
    from meshlm.server.metrics import ServerMetrics

    def scrape(metrics: ServerMetrics, stats: SpecDecodeStats) -> dict[str, float]:
        text = metrics.render({"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "spec_decode": stats})
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
                if line.startswith("meshlm:spec_decode")}

    metrics = ServerMetrics("m")
    scrape(metrics, SpecDecodeStats(2, 6, 3))
    samples = scrape(metrics, SpecDecodeStats(5, 15, 12))  # counters carry totals, not sums of totals
    assert samples["meshlm:spec_decode_num_drafts_total"] == 5
    assert samples["meshlm:spec_decode_num_draft_tokens_total"] == 15
    assert samples["meshlm:spec_decode_num_accepted_tokens_total"] == 12
    assert samples["meshlm:spec_decode_acceptance_rate"] == pytest.approx(12 / 15)
    assert samples["meshlm:spec_decode_mean_acceptance_length"] == pytest.approx(1 + 12 / 5)
    summary = _spec_decode_summary((2, 6, 3), (5, 15, 12))  # one measured run: the difference
    assert summary["acceptance_rate"] == pytest.approx(9 / 9) and summary["mean_acceptance_length"] == 4.0


def test_drafts_keep_the_step_within_max_batch_size_rows():
    """The sampler's memory is sized for max_batch_size rows: 2 decodes at max_batch_size=3 leave
    room for one draft in all."""
    kv = KVCacheManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_tokens=64, max_batch_size=3), kv, NgramProposer(3, 1, 3))
    requests = [Request(f"r{i}", [5, 6, 7, 8, 5, 6], SamplingParams(temperature=0.0, max_tokens=20)) for i in range(2)]
    for request in requests:
        scheduler.add(request)
    prefill = scheduler.schedule()
    scheduler.update_from_output(prefill, StepResult(np.array([7, 7]), None, None, None))
    verify = scheduler.schedule()
    assert [c.draft_token_ids for c in verify.chunks] == [[8], []]
