"""How a model's linear layers are quantized: FP8 at load, or as a published FP8 checkpoint stores them.

``QuantizationConfig`` comes from config.json's ``quantization_config`` or from ``quantization="fp8"``
(weights quantized at load). It names the scale tensors a checkpoint must hold beside each float8
weight and the shapes they may have:

- Hugging Face ``quant_method: "fp8"``: ``<layer>.weight_scale`` of one element (per tensor; shape
  ``[]`` or ``[1]``) and, with ``activation_scheme: "static"``, ``<layer>.input_scale``; or with
  ``weight_block_size: [bn, bk]``, ``<layer>.weight_scale_inv`` [ceil(N / bn), ceil(K / bk)].
- compressed-tensors (``quant_method: "compressed-tensors"``, float8 weights of 8 bits):
  ``<layer>.weight_scale`` [N, 1] (strategy ``channel``), [1] (``tensor``) or blocks (``block``);
  ``<layer>.input_scale`` [1] when its input activations are static per-tensor.

Layers listed as not quantized (``ignore``, ``ignored_layers``, ``modules_to_not_convert``) keep the
model dtype, as vLLM keeps them: their checkpoint weights are high precision, and quantizing at load
leaves them so too. An entry names a module (``model.layers.0.mlp.down_proj``), any run of whole
dotted parts of its name (``lm_head``, ``model.layers.0``: every module of layer 0, not of layer 10;
``self_attn``) or, after ``re:``, a regular expression matched from the start of the name
(compressed-tensors' form). meshlm merges Q, K and V, gate and up, and a layer's experts into one
product: their parts are quantized all or none, and a list that names some of them is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

METHODS = ("fp8", "compressed-tensors")  # what ``quantization=`` accepts; both mean float8 weights
STRATEGIES = ("channel", "tensor", "block")


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    """Float8 e4m3 linear weights, per output channel in memory; how the checkpoint stores them.

    ``checkpoint_format`` None: the checkpoint holds high-precision weights, quantized at load.
    """

    checkpoint_format: str | None = None  # None, "fp8" (Hugging Face) or "compressed-tensors"
    weight_strategy: str = "channel"  # of the checkpoint's scales: channel, tensor or block
    weight_block_size: tuple[int, int] | None = None  # [rows, columns] of one block
    is_static_input: bool = False  # the checkpoint holds one input_scale per layer
    ignore: tuple[str, ...] = ()
    # compressed-tensors' config_groups targets: "Linear" (every linear layer), names or re: patterns;
    # a module no target names is not quantized
    targets: tuple[str, ...] = ("Linear",)

    def __post_init__(self) -> None:
        if self.weight_strategy not in STRATEGIES:
            raise ValueError(f"quantization_config: weight strategy {self.weight_strategy!r}; meshlm reads "
                             f"{', '.join(STRATEGIES)}")
        if (self.weight_strategy == "block") != (self.weight_block_size is not None):
            raise ValueError(f"quantization_config: strategy {self.weight_strategy!r} with weight_block_size="
                             f"{self.weight_block_size}; a block size goes with the block strategy only")

    @classmethod
    def at_load(cls, ignore: tuple[str, ...] = ()) -> "QuantizationConfig":
        """FP8 weights quantized from a high-precision checkpoint while loading; the modules
        ``ignore`` names keep the model dtype."""
        return cls(ignore=tuple(ignore))

    def as_at_load(self) -> "QuantizationConfig":
        """The same layers quantized (``ignore``, ``targets``), from high-precision weights at load."""
        return QuantizationConfig(ignore=self.ignore, targets=self.targets)

    def for_unquantized_checkpoint(self) -> "QuantizationConfig":
        """This config, given by ``hf_overrides`` to a checkpoint of high-precision weights: quantizing
        at load (as_at_load); what needs float8 files fails by name."""
        if self.is_static_input:
            raise ValueError("hf_overrides quantization_config: static input activations need the calibrated "
                             "input_scale tensors of an FP8 checkpoint, and this checkpoint's config.json has no "
                             "quantization_config; weights quantized at load scale activations per token: "
                             "use activation_scheme 'dynamic'")
        if self.weight_block_size is not None:
            raise ValueError(f"hf_overrides quantization_config: weight_block_size={list(self.weight_block_size)} "
                             f"describes block scales stored in an FP8 checkpoint, and this checkpoint's "
                             f"config.json has no quantization_config; weights quantized at load take one "
                             f"scale per output channel: leave weight_block_size out")
        return self.as_at_load()

    def for_layer(self, modules: list[str]) -> "QuantizationConfig | None":
        """The quantization of one layer that merges the checkpoint modules ``modules`` (Q, K and V;
        gate and up; a layer's experts; or one module): None when ``ignore`` lists every one of
        them, this config when it lists none. A merged layer is quantized whole or not at all."""
        ignored = [m for m in modules if self._is_ignored(m)]
        if not ignored:
            return self
        if len(ignored) == len(modules):
            return None
        quantized = [m for m in modules if m not in ignored]
        raise ValueError(f"quantization_config lists {ignored} as not quantized but not {quantized}; meshlm "
                         f"computes them as one layer, whose parts are quantized all or none: list every "
                         f"one of them or none (ignore entries: {list(self.ignore)})")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "QuantizationConfig":
        """config.json's ``quantization_config``; other methods than float8 ones fail with their name."""
        method = hf.get("quant_method")
        if method == "fp8":
            return _from_hf_fp8(hf)
        if method == "compressed-tensors":
            return _from_compressed_tensors(hf)
        raise ValueError(f"config.json: quantization_config.quant_method={method!r}; meshlm loads "
                         f"{', '.join(METHODS)} (float8) checkpoints")

    # --- names and shapes ----------------------------------------------------------------------
    def is_prequantized(self, weight_name: str) -> bool:
        """Whether the checkpoint stores ``weight_name`` as float8 (with scales beside it)."""
        return self.checkpoint_format is not None and not self._is_ignored(_module(weight_name))

    def scale_name(self, weight_name: str) -> str:
        suffix = "weight_scale_inv" if self.checkpoint_format == "fp8" and self.weight_strategy == "block" \
            else "weight_scale"
        return f"{_module(weight_name)}.{suffix}"

    def input_scale_name(self, weight_name: str) -> str:
        return f"{_module(weight_name)}.input_scale"

    def scale_shapes(self, weight_name: str, shape: tuple[int, int]) -> dict[str, frozenset[tuple[int, ...]]]:
        """The scale tensors of the float8 weight ``weight_name`` of full ``shape`` [N, K], each with
        the shapes it may have; empty when the checkpoint stores the weight unquantized."""
        if not self.is_prequantized(weight_name):
            return {}
        rows, cols = shape
        if self.weight_strategy == "block":
            bn, bk = self.weight_block_size
            weight = frozenset({(-(-rows // bn), -(-cols // bk))})
        elif self.weight_strategy == "channel":
            weight = frozenset({(rows, 1), (rows,)})
        else:
            weight = frozenset({(), (1,)})
        shapes = {self.scale_name(weight_name): weight}
        if self.is_static_input:
            shapes[self.input_scale_name(weight_name)] = frozenset({(), (1,)})
        return shapes

    def _is_ignored(self, module: str) -> bool:
        if not any(t == "Linear" or _matches(t, module) for t in self.targets):
            return True
        return any(_matches(entry, module) for entry in self.ignore)


def _matches(entry: str, module: str) -> bool:
    """Whether an ignore or targets entry names ``module``: a ``re:`` pattern matched from the start,
    else whole dotted parts of the name (``model.layers.1`` is not ``model.layers.10``)."""
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return f".{entry}." in f".{module}."


def _module(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def _from_hf_fp8(hf: dict[str, Any]) -> QuantizationConfig:
    fmt = hf.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config.json: quantization_config.fmt={fmt!r}; meshlm loads float8 e4m3 weights")
    scheme = hf.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"config.json: quantization_config.activation_scheme={scheme!r}; expected static or dynamic")
    block = hf.get("weight_block_size")
    if block is not None and (len(block) != 2 or min(block) < 1):
        raise ValueError(f"config.json: quantization_config.weight_block_size={block}; expected [rows, columns]")
    ignore = tuple(hf.get("ignored_layers") or ()) + tuple(hf.get("modules_to_not_convert") or ())
    return QuantizationConfig("fp8", "block" if block else "tensor", tuple(block) if block else None,
                              scheme == "static", ignore)


def _from_compressed_tensors(hf: dict[str, Any]) -> QuantizationConfig:
    groups = list((hf.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not groups or any(w != weights[0] for w in weights[1:]):
        raise ValueError(f"config.json: compressed-tensors config_groups {hf.get('config_groups')}: meshlm "
                         f"loads one float8 scheme for every linear layer")
    w = weights[0]
    if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("dynamic"):
        raise ValueError(f"config.json: compressed-tensors weights {w}; meshlm loads static float8 "
                         f"(type float, num_bits 8) weights")
    strategy = w.get("strategy")
    block = w.get("block_structure")
    if strategy not in STRATEGIES:
        raise ValueError(f"config.json: compressed-tensors weight strategy {strategy!r}; meshlm loads "
                         f"{', '.join(STRATEGIES)}")
    act = groups[0].get("input_activations") or {}
    is_static = bool(act) and not act.get("dynamic", False)
    if is_static and act.get("strategy") != "tensor":
        raise ValueError(f"config.json: compressed-tensors static input activations of strategy "
                         f"{act.get('strategy')!r}; meshlm reads per-tensor input scales")
    targets = tuple(t for g in groups for t in g.get("targets") or ("Linear",))
    return QuantizationConfig("compressed-tensors", strategy, tuple(block) if block else None, is_static,
                              tuple(hf.get("ignore") or ()), targets)
