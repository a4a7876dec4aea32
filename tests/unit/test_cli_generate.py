"""``meshlm generate --skip-tokenizer-init``: prompts are token ids, the output is token ids."""
from __future__ import annotations

import pytest

from meshlm.cli import token_ids_of
from tests.model_factory import make_random_model

PROMPT_IDS = [5, 17, 42, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model(tmp_path_factory.mktemp("cli") / "m", "llama", num_hidden_layers=1, seed=5)


def _flags(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--skip-tokenizer-init", "--max-tokens", "6",
            "--no-enable-cuda-graphs"]


def test_token_id_prompts_print_token_ids(model_dir, capsys):
    from meshlm.api.llm import LLM
    from meshlm.cli import main
    from meshlm.sampling_params import SamplingParams
    assert main(["generate", "5, 17, 42, 9", *_flags(model_dir)]) == 0
    printed = capsys.readouterr().out.split()
    llm = LLM(model=str(model_dir), device="cpu", skip_tokenizer_init=True, enable_cuda_graphs=False)
    try:
        expected = llm.generate([PROMPT_IDS], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    finally:
        llm.shutdown()
    want = expected[0].outputs[0].token_ids
    assert printed == [str(t) for t in want[:len(printed)]] and len(printed) >= 1, (printed, want)


def test_text_prompt_without_a_tokenizer_is_refused(model_dir, capsys):
    from meshlm.cli import main
    assert main(["generate", "hello world", *_flags(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "hello world" in err and "token ids" in err and "--skip-tokenizer-init" in err, err


@pytest.mark.parametrize("text, ids", [("1, 2, 3", [1, 2, 3]), ("1 2 3", [1, 2, 3]), ("7,8", [7, 8]),
                                       (" 4 ,5 ", [4, 5])])
def test_token_ids_of(text, ids):
    assert token_ids_of(text) == ids


@pytest.mark.parametrize("text", ["", "1, x", "-1 2", "1.5", ", ,"])
def test_token_ids_of_refuses(text):
    with pytest.raises(ValueError, match="token ids"):
        token_ids_of(text)
