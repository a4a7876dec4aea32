"""Convert a llama-architecture GGUF file into a Hugging Face layout directory.

The result holds `config.json`, `generation_config.json`, `model.safetensors` (float32),
`tokenizer.json` and `tokenizer_config.json`, so the rest of meshlm, and transformers, load it like
any Hugging Face checkpoint. Every tensor is dequantized with the `gguf` package.

Weights are written in float32, not bfloat16: a Q4_1 value is `d * q + m` and a Q8_0 value is `d * q`
with `d`, `m` in float16 and `q` a 4- or 8-bit integer, which needs up to 19 significant bits, more
than bfloat16's 8. float32 holds every dequantized value exactly.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshlm.weights.gguf_tokenizer import PRE_TOKENIZER_KINDS, build_tokenizer, hf_tokenizer_config

# gguf tensor name (without "blk.N.") -> Hugging Face name (without "model.layers.N.").
_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True, slots=True)
class LlamaGGUFMetadata:
    """What a llama GGUF says about its model and tokenizer, in Hugging Face terms."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: dict | None
    rms_norm_eps: float
    max_position_embeddings: int
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre_tokenizer: str
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    is_bos_added: bool
    is_eos_added: bool
    chat_template: str | None

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the Hugging Face layout of a llama GGUF into `out_dir` and return it.

    The files are written into a temporary sibling directory that is renamed to `out_dir` at the end,
    so an interrupted conversion never leaves a half-written `out_dir`. `out_dir` must not exist.
    """
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"cannot convert {gguf_path} into {out_dir}: it already exists")
    reader = gguf.GGUFReader(gguf_path)
    meta = read_llama_metadata(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o755)
        tensors = dequantize_llama_tensors(reader, meta)
        is_tied = "lm_head.weight" not in tensors
        _save_safetensors(tensors, tmp_dir / "model.safetensors")
        del tensors
        _write_json(tmp_dir / "config.json", hf_config(meta, is_tied))
        _write_json(tmp_dir / "generation_config.json", hf_generation_config(meta))
        build_tokenizer(meta).save(str(tmp_dir / "tokenizer.json"))
        _write_json(tmp_dir / "tokenizer_config.json", hf_tokenizer_config(meta))
        for path in tmp_dir.iterdir():
            path.chmod(0o644)
        os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def read_llama_metadata(reader) -> LlamaGGUFMetadata:
    """The model and tokenizer metadata of a GGUF; ValueError unless it is a llama byte-level BPE."""
    fields = {key: _field_value(field) for key, field in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files can be converted; this one is {arch!r}")
    tokenizer_model = fields.get("tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ValueError(f"only byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2') are supported; "
                         f"this GGUF has {tokenizer_model!r}")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_KINDS:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(PRE_TOKENIZER_KINDS)}")

    def required(key: str):
        if key not in fields:
            raise ValueError(f"the GGUF lacks the metadata key {key!r}")
        return fields[key]

    hidden_size = int(required("llama.embedding_length"))
    num_heads = int(required("llama.attention.head_count"))
    head_dim = int(fields.get("llama.rope.dimension_count", hidden_size // num_heads))
    return LlamaGGUFMetadata(
        name=str(fields.get("general.name", "")),
        num_layers=int(required("llama.block_count")),
        hidden_size=hidden_size,
        intermediate_size=int(required("llama.feed_forward_length")),
        num_heads=num_heads,
        num_kv_heads=int(fields.get("llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=_short_float(fields.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(fields),
        rms_norm_eps=_short_float(required("llama.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(required("llama.context_length")),
        tokens=list(required("tokenizer.ggml.tokens")),
        token_types=[int(t) for t in fields.get("tokenizer.ggml.token_type", [])],
        merges=list(required("tokenizer.ggml.merges")),
        pre_tokenizer=pre,
        bos_token_id=_optional_int(fields.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_optional_int(fields.get("tokenizer.ggml.eos_token_id")),
        unk_token_id=_optional_int(fields.get("tokenizer.ggml.unknown_token_id")),
        pad_token_id=_optional_int(fields.get("tokenizer.ggml.padding_token_id")),
        is_bos_added=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        is_eos_added=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
    )


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q or K projection.

    llama.cpp's converter reorders the rows of each head from Hugging Face's "rotate half" layout
    (first half of the head, then second half) into interleaved pairs, for its own rotary kernel:
    `w.reshape(num_heads, 2, half, in).swapaxes(1, 2)`. This is its inverse. `num_heads` is the
    number of query heads for Q and of KV heads for K.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"cannot unpermute {rows} rows over {num_heads} heads: "
                         f"rows must be a multiple of 2 * num_heads = {2 * num_heads}")
    half = rows // num_heads // 2
    # [num_heads, half, 2, in] -> [num_heads, 2, half, in]
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(w.reshape(weight.shape))


def dequantize_llama_tensors(reader, meta: LlamaGGUFMetadata) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF as float32, under its Hugging Face name, Q and K rows unpermuted."""
    from gguf.quants import dequantize

    expected = _expected_shapes(meta)
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        hf_name = _hf_tensor_name(tensor.name)
        # numpy shape [out_features, in_features]: gguf lists dims innermost first.
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rotary_rows(weight, meta.num_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rotary_rows(weight, meta.num_kv_heads)
        want = expected[_shape_key(hf_name)]
        if tuple(weight.shape) != want:
            raise ValueError(f"GGUF tensor {tensor.name} has shape {tuple(weight.shape)}; "
                             f"the metadata implies {want}")
        tensors[hf_name] = np.ascontiguousarray(weight)
    missing = _required_hf_names(meta) - tensors.keys()
    if missing:
        raise ValueError(f"the GGUF lacks tensors for {sorted(missing)}")
    return tensors


def hf_config(meta: LlamaGGUFMetadata, is_tied: bool) -> dict:
    """The `config.json` of a LlamaForCausalLM with this metadata."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.vocab_size,
        "hidden_size": meta.hidden_size,
        "intermediate_size": meta.intermediate_size,
        "num_hidden_layers": meta.num_layers,
        "num_attention_heads": meta.num_heads,
        "num_key_value_heads": meta.num_kv_heads,
        "head_dim": meta.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": meta.max_position_embeddings,
        "rms_norm_eps": meta.rms_norm_eps,
        "rope_theta": meta.rope_theta,
        "rope_scaling": meta.rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": is_tied,
        "bos_token_id": meta.bos_token_id,
        "eos_token_id": meta.eos_token_id,
        "pad_token_id": meta.pad_token_id,
        "torch_dtype": "float32",
    }


def hf_generation_config(meta: LlamaGGUFMetadata) -> dict:
    return {"bos_token_id": meta.bos_token_id, "eos_token_id": meta.eos_token_id,
            "pad_token_id": meta.pad_token_id}


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSOR_NAMES:
        return _GLOBAL_TENSOR_NAMES[gguf_name]
    match = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSOR_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSOR_NAMES[match.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face llama equivalent "
                     f"(known: {sorted(_GLOBAL_TENSOR_NAMES)} and blk.N.{{{', '.join(_LAYER_TENSOR_NAMES)}}})")


def _shape_key(hf_name: str) -> str:
    return re.sub(r"^model\.layers\.\d+\.", "", hf_name)


def _expected_shapes(meta: LlamaGGUFMetadata) -> dict[str, tuple[int, ...]]:
    h, f, d = meta.hidden_size, meta.intermediate_size, meta.head_dim
    return {
        "model.embed_tokens.weight": (meta.vocab_size, h),
        "lm_head.weight": (meta.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (meta.num_heads * d, h),
        "self_attn.k_proj.weight": (meta.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (meta.num_kv_heads * d, h),
        "self_attn.o_proj.weight": (h, meta.num_heads * d),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }


def _required_hf_names(meta: LlamaGGUFMetadata) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for layer in range(meta.num_layers):
        names.update(f"model.layers.{layer}.{hf}" for hf in _LAYER_TENSOR_NAMES.values())
    return names


def _rope_scaling(fields: dict) -> dict | None:
    kind = fields.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(fields["llama.rope.scaling.factor"])}
    raise ValueError(f"unsupported llama.rope.scaling.type {kind!r} (supported: none, linear)")


def _field_value(field):
    """A GGUF metadata value as a Python str, number or list (works with old and new `gguf`)."""
    from gguf import GGUFValueType

    def scalar(kind, part):
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.types[-1], field.parts[i]) for i in field.data]
    return scalar(field.types[0], field.parts[field.data[0]])


def _short_float(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
