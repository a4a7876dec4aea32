"""Which layers' FP8 error costs the most: fp8_quality.py's perplexity, FP8 emulated in transformers.

    PYTHONPATH=. python benchmarks/fp8_sensitivity.py both/all both/!model.layers.0,model.layers.29
    PYTHONPATH=. python benchmarks/fp8_sensitivity.py weights/all activations/all both/mlp --greedy

Each argument is a setting ``PARTS/MODULES``: PARTS ``weights``, ``activations`` or ``both`` (what is
quantized), MODULES ``all``, or comma-separated modules and name parts as quantization_config's
``ignored_layers`` takes them (``model.layers.29``, ``mlp``, ``re:...``), ``!`` first for all but
those. The decoder's linear layers of the default model (or ``--model``) in float32 compute meshlm's
FP8 arithmetic on the CPU: weights rounded to float8 e4m3 with the least-error scale of each row (as
meshlm quantizes at load), activations rounded per token with ``amax / 448``. One forward per window
of fp8_quality.py's text, so a setting takes seconds where a meshlm run takes minutes; its numbers
follow meshlm's closely but not exactly (float8 rounding flips on the last bits of float32 sums).
``--greedy`` adds fp8_quality.py's count of the 20 prompts whose first 16 greedy tokens are unchanged.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fp8_quality import NUM_GREEDY_TOKENS, PROMPTS, TEXT  # noqa: E402  (beside this file)

FP8_MAX = 448.0


def fp8_round(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def selected(spec: str, names: list[str]) -> set[str]:
    """The modules of ``names`` that ``spec`` (``all``, ``[!]ENTRY,ENTRY...``) picks."""
    from meshlm.weights.quantization import QuantizationConfig
    if spec == "all":
        return set(names)
    is_complement = spec.startswith("!")
    entries = QuantizationConfig.at_load(tuple(spec.lstrip("!").split(",")))
    named = {n for n in names if entries.for_layer([n]) is None}
    return set(names) - named if is_complement else named


class EmulatedFP8:
    """The transformers model whose chosen linear layers round weights and/or activations to FP8."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM
        from tests.model_factory import least_error_row_scales
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.linears = {n: m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
        self.weights = {n: m.weight.data.clone() for n, m in self.linears.items()}
        self.rounded = {n: fp8_round(w, least_error_row_scales(w)) for n, w in self.weights.items()}
        self.hooks = []

    def set(self, setting: str) -> None:
        parts, _, spec = setting.partition("/")
        if parts not in ("weights", "activations", "both") or not spec:
            raise SystemExit(f"setting {setting!r}: expected weights|activations|both/MODULES")
        chosen = selected(spec, list(self.linears))
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        for name, module in self.linears.items():
            is_weight = name in chosen and parts != "activations"
            module.weight.data = self.rounded[name] if is_weight else self.weights[name]
            if name in chosen and parts != "weights":
                self.hooks.append(module.register_forward_pre_hook(lambda _, args: (_round_per_token(args[0]),)))


def _round_per_token(x: torch.Tensor) -> torch.Tensor:
    return fp8_round(x, (x.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12))


@torch.no_grad()
def perplexity(model, ids: list[int], window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logprobs = torch.log_softmax(model(torch.tensor([chunk])).logits[0, :-1].double(), dim=-1)
        nll -= float(logprobs[torch.arange(len(chunk) - 1), torch.tensor(chunk[1:])].sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(NUM_GREEDY_TOKENS):  # whole sequences: no cache to round differently
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        outputs.append(tokens[len(prompt):])
    return outputs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="PARTS/MODULES, e.g. both/!model.layers.0,model.layers.29")
    parser.add_argument("--model", default=None, help="model directory (default: the built-in default model)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--greedy", action="store_true", help="count unchanged greedy continuations too")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer
    from meshlm.weights.resolve import resolve_model_on_ranks
    model_dir = str(resolve_model_on_ranks(args.model, None, None))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for p in PROMPTS]
    emulated = EmulatedFP8(model_dir)
    base = perplexity(emulated.model, ids, args.window)
    reference = greedy(emulated.model, prompts) if args.greedy else None
    print(f"{'unquantized':60s} perplexity {base:8.4f}", flush=True)
    for setting in args.settings:
        emulated.set(setting)
        ppl = perplexity(emulated.model, ids, args.window)
        line = f"{setting:60s} perplexity {ppl:8.4f} ({100 * (ppl / base - 1):+.2f} %)"
        if reference is not None:
            equal = sum(g == r for g, r in zip(greedy(emulated.model, prompts), reference))
            line += f"   greedy equal on {equal}/{len(PROMPTS)} prompts"
        print(line, flush=True)


if __name__ == "__main__":
    main()
