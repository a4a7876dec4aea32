"""``meshlm serve`` over several MPI ranks: HTTP on rank 0, every rank executing each step.

Two launches: ``meshlm serve --tp 3`` as a plain process (it relaunches itself under mpiexec) with
the default model (9 heads over 3 KV heads), stopped by SIGTERM to mpiexec; and
``mpiexec -n 2 meshlm serve --tp 2`` with a random-weight Llama, stopped by SIGINT. The reference
text is the same model's greedy output at tp=1 from ``LLM(...)`` in this process; every rank must
be gone, and mpiexec must exit 0, after the signal.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from tests.dist.proc_tree import descendants, wait_until_gone
from tests.server_process import ServerProcess, server_env

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec beside {sys.executable}")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _greedy_reference(model_dir: Path, prompts: list, max_tokens: int, ignore_eos: bool = False) -> list[str]:
    from meshlm import LLM, SamplingParams
    llm = LLM(str(model_dir), max_model_len=256, num_kv_blocks=64, device="cpu")
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        return [o.outputs[0].text for o in llm.generate(prompts, params)]
    finally:
        llm.shutdown()


def _rank_pids(server: ServerProcess, num_ranks: int) -> list[int]:
    ranks = [p["pid"] for p in descendants(server.proc.pid) if "-m meshlm serve" in p["cmdline"]]
    assert len(ranks) == num_ranks, (descendants(server.proc.pid), server.log()[-3000:])
    return ranks


def _stop_and_check(server: ServerProcess, sig: int, num_ranks: int) -> None:
    ranks = _rank_pids(server, num_ranks)
    code = server.stop(sig, timeout_s=90)
    assert code == 0, f"mpiexec exited {code} after {signal.Signals(sig).name}:\n{server.log()[-6000:]}"
    assert wait_until_gone(ranks) == [], "ranks outlived mpiexec"
    assert "server stopped" in server.log()


def _stream_text(client, model: str, **kw) -> tuple[str, dict]:
    chunks = list(client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                 **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


@pytest.mark.slow
def test_serve_tp3_default_model_sigterm(default_model, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(default_model))
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    chat_ids = chat_ids if isinstance(chat_ids, list) else chat_ids["input_ids"]
    ref_completion, ref_chat = _greedy_reference(default_model, ["The capital of France is", chat_ids], 12)

    argv = [sys.executable, "-m", "meshlm", "serve", "--tp", "3", "--model", str(default_model), "--port", "0",
            "--max-model-len", "256", "--num-kv-blocks", "64"]
    server = ServerProcess(argv, tmp_path / "server.log", env=server_env(OMP_NUM_THREADS="1"))
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [default_model.name]
        out = client.completions.create(model=default_model.name, prompt="The capital of France is",
                                        max_tokens=12, temperature=0)
        assert out.choices[0].text == ref_completion
        text, usage = _stream_text(client, default_model.name, messages=CHAT, max_tokens=12, temperature=0)
        assert text == ref_chat and usage.prompt_tokens == len(chat_ids)
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hello " * 300}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        _check_api_extras(client, default_model.name)
        _stop_and_check(server, signal.SIGTERM, num_ranks=3)
    finally:
        server.kill()


WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["celsius", "fahrenheit"]}}}


def _check_api_extras(client, model: str) -> None:
    """At tp=3: a named tool call and a JSON-schema answer that parse and follow their schemas, beam
    search's n best beams, and the echoed prompt's logprobs."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                         tools=tools, max_tokens=40, temperature=0,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = out.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(arguments) == {"city", "unit"}
    assert arguments["city"] in ("Paris", "Rome") and arguments["unit"] in ("celsius", "fahrenheit")
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=40, temperature=0,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "w", "schema": WEATHER}})
    assert set(json.loads(out.choices[0].message.content)) == {"city", "unit"}
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, n=2,
                                    extra_body={"use_beam_search": True, "best_of": 3})
    assert len(out.choices) == 2 and out.choices[0].text != out.choices[1].text
    out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=2, echo=True,
                                    logprobs=1, temperature=0)
    logprobs = out.choices[0].logprobs
    assert out.choices[0].text.startswith("The capital of France is")
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from tests.model_factory import make_random_model
    return make_random_model(tmp_path_factory.mktemp("server-tiny") / "llama", "llama")


def test_serve_tp2_under_mpiexec_sigint(tiny_llama, tmp_path):
    from meshlm.launcher.world import mpiexec_command
    prompt = [5, 17, 42, 99, 7, 250]  # token ids of the test tokenizer's vocabulary
    (ref,) = _greedy_reference(tiny_llama, [prompt], 8, ignore_eos=True)

    argv = mpiexec_command(2, [sys.executable, "-m", "meshlm", "serve", "--tp", "2", "--model", str(tiny_llama),
                               "--port", "0", "--served-model-name", "tiny", "--max-model-len", "256",
                               "--num-kv-blocks", "64"])
    server = ServerProcess(argv, tmp_path / "server.log", env=server_env(OMP_NUM_THREADS="1"))
    try:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref
        assert r.json()["usage"] == {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}
        streamed = httpx.post(server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60)
        events = [e for e in streamed.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == ref
        _stop_and_check(server, signal.SIGINT, num_ranks=2)
    finally:
        server.kill()
