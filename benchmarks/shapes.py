"""Model shapes for the GPU benchmarks: Hugging Face config.json contents (no weights needed;
the engine draws random weights of these shapes with load_format="random")."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128001,
}

LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}

MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
    "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}

# For trying the scripts on a CPU (MESHLM_DEVICE=cpu).
TINY = {**LLAMA3_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2}

TINY_MOE = {**MIXTRAL_8X7B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "torch_dtype": "float32"}

SHAPES = {"tiny": TINY, "tiny-moe": TINY_MOE, "mixtral-8x7b": MIXTRAL_8X7B, "llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}


def model_dir(name: str, root: str | None = None) -> Path:
    """A directory holding only config.json for the named shape."""
    path = Path(root or tempfile.mkdtemp(prefix="meshlm-shape-")) / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(SHAPES[name]))
    return path


def weight_bytes(cfg: dict, bytes_per_param: int = 2, experts_read: int | None = None) -> int:
    """Bytes of weights read once per decode step (embedding rows excluded: only B rows are read).

    For MoE shapes, ``experts_read`` experts per layer are read (default: the top-k of one token).
    """
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    experts = experts_read or cfg.get("num_experts_per_tok", 1)
    router = h * cfg.get("num_local_experts", 0)
    per_layer = h * (h + 2 * kv) + h * h + experts * 3 * h * inter + 2 * h + router
    return (layers * per_layer + cfg["vocab_size"] * h + h) * bytes_per_param
