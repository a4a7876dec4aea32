"""FP8 arithmetic (kernels/fp8.py), reading float8 shards (parallel/fp8_weights.py) and the
``quantization_config`` of published checkpoints (weights/quantization.py), on known values."""
from __future__ import annotations

import pytest
import torch

from meshlm.config import EngineArgs
from meshlm.kernels import fp8
from meshlm.parallel.fp8_weights import SCALE_CANDIDATES, quantize_weight_rows, read_fp8, read_input_scale
from meshlm.weights.quantization import QuantizationConfig

E4M3 = torch.float8_e4m3fn


def test_quantize_per_row_maps_each_row_max_to_448():
    x = torch.tensor([[0.5, -1.0, 2.0, 4.0], [1.0, 0.0, 0.0, -3.0]])
    q, scale = fp8.quantize_per_row(x)
    assert q.dtype == E4M3 and scale.shape == (2, 1) and scale.dtype == torch.float32
    assert scale[:, 0].tolist() == pytest.approx([4.0 / 448, 3.0 / 448])
    # 56, 112, 224 and 448 are float8 e4m3 values: the round trip is exact
    assert q[0].float().tolist() == [56.0, -112.0, 224.0, 448.0]
    torch.testing.assert_close(fp8.dequantize(q[:1], scale[:1]), x[:1], rtol=0, atol=1e-6)
    # 1 / (3 / 448) = 149.3 is not: it rounds to 144
    assert q[1].float().tolist() == [144.0, 0.0, 0.0, -448.0]


def test_quantize_rounds_to_the_nearest_float8_and_saturates():
    # Between 128 and 256 float8 e4m3 steps by 16: 149.3 -> 144, 153 -> 160; 1000 saturates at 448.
    q = fp8.quantize_with_scale(torch.tensor([149.3, 153.0, 1000.0, -1000.0]), torch.tensor(1.0))
    assert q.float().tolist() == [144.0, 160.0, 448.0, -448.0]


def test_rows_are_multiplied_by_the_reciprocal_of_their_scale():
    # With the row's scale s = 5.8008... / 448: 5.1792... / s is 400.00003 (float8 e4m3: 416), while
    # 5.1792... * (1 / s) is 400.0, halfway between 384 and 416, which rounds to the even 384.
    x = torch.tensor([[5.800803184509277, 5.179288864135742]])
    q, scale = fp8.quantize_per_row(x)
    assert q[0].float().tolist() == [448.0, 384.0]
    assert fp8.quantize_with_scale(x, scale)[0].float().tolist() == [448.0, 416.0]  # a division


def test_zero_row_quantizes_to_zeros_without_nan():
    q, scale = fp8.quantize_per_row(torch.zeros(1, 8))
    assert q.float().abs().sum() == 0 and torch.isfinite(scale).all() and scale.item() > 0


def test_scaled_linear_is_the_product_of_the_dequantized_operands():
    torch.manual_seed(0)
    x, w = torch.randn(5, 32), torch.randn(48, 32)
    w_q, w_scale = fp8.quantize_per_row(w)
    x_q, x_scale = fp8.quantize_per_row(x)
    expected = (x_q.float() * x_scale) @ (w_q.float() * w_scale).t()  # [5, 48]
    got = fp8.scaled_linear(x, w_q, w_scale[:, 0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and it is close to the unquantized product: float8 keeps about 2 significant digits
    assert (got - x @ w.t()).abs().max() < 0.15 * (x @ w.t()).abs().max()


@pytest.mark.parametrize("fast", [False, True])
def test_the_fast_accumulation_switch_reaches_the_scaled_product(fast, monkeypatch):
    """set_fast_accumulation decides use_fast_accum of every torch._scaled_mm call from then on."""
    calls = []
    monkeypatch.setattr(fp8, "can_use_scaled_mm", lambda x_q, weight: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: calls.append(kwargs["use_fast_accum"]))
    monkeypatch.setitem(fp8._FAST_ACCUMULATION, "enabled", False)
    fp8.set_fast_accumulation(fast)
    x_q, x_scale = fp8.quantize_per_row(torch.ones(2, 16))
    w_q, w_scale = fp8.quantize_per_row(torch.ones(16, 16))
    fp8.scaled_product(x_q, x_scale, w_q, w_scale[:, 0])
    assert calls == [fast]


def test_fp8_products_accumulate_fast_by_default(monkeypatch):
    """Unless switched off, torch._scaled_mm is asked for fast accumulation (as vLLM's FP8 products)."""
    calls = []
    monkeypatch.setattr(fp8, "can_use_scaled_mm", lambda x_q, weight: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *args, **kwargs: calls.append(kwargs["use_fast_accum"]))
    x_q, x_scale = fp8.quantize_per_row(torch.ones(2, 16))
    w_q, w_scale = fp8.quantize_per_row(torch.ones(16, 16))
    fp8.scaled_product(x_q, x_scale, w_q, w_scale[:, 0])
    assert calls == [True]


def test_static_input_scale_replaces_the_per_row_scale():
    w_q = torch.tensor([[1.0, 2.0]]).to(E4M3)
    x = torch.tensor([[0.5, 0.25], [3.0, 0.0]])
    got = fp8.scaled_linear(x, w_q, torch.tensor([2.0]), input_scale=torch.tensor([0.25]))
    # x / 0.25 = [[2, 1], [12, 0]] exactly; (x_q * 0.25) @ ([1, 2] * 2)^T
    assert got[:, 0].tolist() == pytest.approx([2.0, 6.0])


def test_weight_only_keeps_activations_unquantized():
    x = torch.tensor([[0.3, -0.7, 1.1, 0.05]])
    w_q = torch.tensor([[1.0, 2.0, -4.0, 8.0], [0.5, 0.5, 0.5, 0.5]]).to(E4M3)
    got = fp8.weight_only_linear(x, w_q, torch.tensor([0.5, 3.0]))
    expected = torch.stack([(x[0] * w_q[0].float()).sum() * 0.5, (x[0] * w_q[1].float()).sum() * 3.0])
    torch.testing.assert_close(got[0], expected)


def test_weight_only_adds_the_bias_and_takes_a_per_tensor_scale():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    w_q = torch.tensor([[2.0, 1.0], [4.0, -8.0], [0.5, 0.0]]).to(E4M3)
    got = fp8.weight_only_linear(x, w_q, torch.tensor([0.5]), torch.tensor([10.0, 20.0, 30.0]))
    # x @ w^T = [[0, 20, 0.5], [1.25, 0, 0.25]], halved, plus the bias
    assert got.tolist() == [[10.0, 30.0, 30.25], [10.625, 20.0, 30.125]]


def test_decode_sized_batches_do_not_quantize_activations():
    """At the default threshold a batch of WEIGHT_ONLY_MAX_ROWS rows multiplies x as it is, one more
    row quantizes it per token: x's entries here are not float8 values, so the two differ."""
    assert fp8.use_weight_only(1)  # batch-1 decode reads the weight through the small-batch kernel
    torch.manual_seed(4)
    w_q, w_scale = fp8.quantize_per_row(torch.randn(24, 64))
    bias = torch.randn(24)
    for rows in (1, fp8.WEIGHT_ONLY_MAX_ROWS, fp8.WEIGHT_ONLY_MAX_ROWS + 1):
        x = torch.randn(rows, 64)
        unquantized = (x.double() @ (w_q.double() * w_scale.double()).t() + bias.double()).float()
        got = fp8.fp8_linear(x, w_q, w_scale[:, 0], bias)
        if rows <= fp8.WEIGHT_ONLY_MAX_ROWS:
            torch.testing.assert_close(got, unquantized, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(got, fp8.scaled_linear(x, w_q, w_scale[:, 0]) + bias)
            assert (got - unquantized).abs().max() > 1e-3


def test_the_path_is_a_function_of_the_row_count(monkeypatch):
    torch.manual_seed(1)
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    w_q, w_scale = fp8.quantize_per_row(w)
    monkeypatch.setattr(fp8, "WEIGHT_ONLY_MAX_ROWS", 4)
    assert fp8.use_weight_only(4) and not fp8.use_weight_only(5)
    torch.testing.assert_close(fp8.fp8_linear(x, w_q, w_scale[:, 0]), fp8.weight_only_linear(x, w_q, w_scale[:, 0]))
    monkeypatch.setattr(fp8, "WEIGHT_ONLY_MAX_ROWS", 0)
    torch.testing.assert_close(fp8.fp8_linear(x, w_q, w_scale[:, 0]), fp8.scaled_linear(x, w_q, w_scale[:, 0]))


@pytest.fixture
def fused_quantization():
    """The fusion switch on for the test (its default), and back on after it."""
    fp8.set_fused_quantization(True)
    yield fp8.set_fused_quantization
    fp8.set_fused_quantization(True)


def test_layers_take_quantized_rows_only_where_they_quantize_per_row(fused_quantization):
    w_scale, static = torch.ones(8), torch.tensor([0.5])
    rows = fp8.WEIGHT_ONLY_MAX_ROWS + 1
    assert fp8.takes_quantized_rows(rows, w_scale, None)
    assert not fp8.takes_quantized_rows(fp8.WEIGHT_ONLY_MAX_ROWS, w_scale, None)  # the weight-only path
    assert not fp8.takes_quantized_rows(rows, None, None)  # a weight in the model dtype
    assert not fp8.takes_quantized_rows(rows, w_scale, static)  # one static scale for every row
    fused_quantization(False)
    assert not fp8.takes_quantized_rows(rows, w_scale, None)


def test_quantized_rows_give_the_product_of_the_rows_they_came_from(fused_quantization):
    torch.manual_seed(5)
    rows = fp8.WEIGHT_ONLY_MAX_ROWS + 3
    x, bias = torch.randn(rows, 64) * 3, torch.randn(24)
    w_q, w_scale = fp8.quantize_per_row(torch.randn(24, 64))
    quantized = fp8.quantize_rows(x)
    assert quantized.values.dtype == E4M3 and quantized.scale.shape == (rows, 1) and quantized.dtype == torch.float32
    got = fp8.linear(quantized, w_q, w_scale[:, 0], bias)
    assert got.dtype == torch.float32 and torch.equal(got, fp8.linear(x, w_q, w_scale[:, 0], bias))
    small = fp8.WEIGHT_ONLY_MAX_ROWS
    with pytest.raises(AssertionError, match=rf"rows \({small}, 64\) came quantized .* weight-only up to {small} rows"):
        fp8.linear(fp8.quantize_rows(x[:small]), w_q, w_scale[:, 0])
    with pytest.raises(AssertionError, match="static input scale: True"):
        fp8.linear(quantized, w_q, w_scale[:, 0], input_scale=torch.tensor([0.1]))


def test_batched_product_matches_one_product_per_expert():
    torch.manual_seed(2)
    x, w = torch.randn(3, 4, 32), torch.randn(3, 16, 32)
    w_q, w_scale = fp8.quantize_per_row(w)  # [3, 16, 32], [3, 16, 1]
    got = fp8.bmm(x, w_q, w_scale[..., 0])
    for e in range(3):
        torch.testing.assert_close(got[e], fp8.scaled_linear(x[e], w_q[e], w_scale[e, :, 0]), rtol=1e-5, atol=1e-5)


class DictReader:
    """A checkpoint of named tensors, read as CheckpointReader reads (slices along one dim)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start)


def _row_errors(q: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ((q.float() * scale - w) ** 2).sum(dim=-1)  # [N]


def test_weight_scales_of_least_error_beat_absmax_on_rows_with_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[32:, 7] = 0.9  # outliers in half the rows, as trained weights have
    w[32::3, 100] = -1.7
    q, scale = quantize_weight_rows(w)
    absmax_scale = w.abs().amax(dim=1, keepdim=True) / 448
    chosen, absmax = _row_errors(q, scale, w), _row_errors(fp8.quantize_with_scale(w, absmax_scale), absmax_scale, w)
    assert (chosen <= absmax * (1 + 1e-5)).all()  # the first candidate is amax * (1 / 448), within an ulp
    # rows without outliers: ~0.9 of absmax's error; with them, absmax (the outlier exactly on 448) mostly wins
    assert chosen[:32].sum() < 0.95 * absmax[:32].sum() and chosen.sum() < absmax.sum()
    # no candidate saturates: each scale lies in [absmax, 2 * absmax) / 448 and nothing is clipped
    assert (scale >= absmax_scale * (1 - 1e-6)).all() and (scale < 2 * absmax_scale).all()
    assert (q.float().abs() < 448).any(dim=1).all() and len(set(scale.view(-1).tolist())) > SCALE_CANDIDATES // 2


def test_each_row_keeps_the_best_of_the_candidate_scales():
    torch.manual_seed(1)
    w = torch.randn(16, 48)
    q, scale = quantize_weight_rows(w)
    amax = w.abs().amax(dim=1, keepdim=True)
    for k in range(SCALE_CANDIDATES):
        s = amax * (2.0 ** (k / SCALE_CANDIDATES) / 448)
        assert (_row_errors(q, scale, w) <= _row_errors(fp8.quantize_with_scale(w, s), s, w) + 1e-12).all()
    zero_q, zero_scale = quantize_weight_rows(torch.zeros(2, 8))
    assert zero_q.float().abs().sum() == 0 and torch.isfinite(zero_scale).all()


def test_row_parallel_shards_keep_the_scales_of_whole_rows():
    torch.manual_seed(3)
    w = torch.randn(8, 32)
    w[:, 20] = 50.0  # the largest entry of every row lies in the second half of the columns
    reader, quant = DictReader({"l.weight": w}), QuantizationConfig.at_load()
    whole, whole_scale = read_fp8(reader, quant, "l.weight")
    halves = [read_fp8(reader, quant, "l.weight", 1, lo, lo + 16) for lo in (0, 16)]
    for weight, scale in halves:
        torch.testing.assert_close(scale, whole_scale, rtol=0, atol=0)
    assert torch.equal(torch.cat([h[0] for h in halves], dim=1).float(), whole.float())
    rows = read_fp8(reader, quant, "l.weight", 0, 2, 6)
    assert torch.equal(rows[0].float(), whole[2:6].float()) and torch.equal(rows[1], whole_scale[2:6])


def test_per_channel_scales_are_cut_with_their_rows_and_kept_whole_with_columns():
    quant = QuantizationConfig("compressed-tensors", "channel", None, False, ())
    q = torch.arange(-16.0, 16.0).reshape(8, 4).to(E4M3)
    scales = torch.arange(1.0, 9.0).reshape(8, 1)
    reader = DictReader({"l.weight": q, "l.weight_scale": scales})
    rows, row_scales = read_fp8(reader, quant, "l.weight", 0, 2, 6)
    assert torch.equal(rows.float(), q[2:6].float()) and row_scales.tolist() == [3.0, 4.0, 5.0, 6.0]
    cols, col_scales = read_fp8(reader, quant, "l.weight", 1, 2, 4)
    assert torch.equal(cols.float(), q[:, 2:4].float()) and col_scales.tolist() == scales[:, 0].tolist()


def test_per_tensor_scales_of_merged_parts_stay_exact():
    quant = QuantizationConfig("fp8", "tensor", None, True, ())
    q = torch.tensor([[1.0, 2.0], [4.0, 8.0]]).to(E4M3)
    reader = DictReader({"q.weight": q, "q.weight_scale": torch.tensor(0.5), "q.input_scale": torch.tensor(0.1),
                         "k.weight": q, "k.weight_scale": torch.tensor([2.0]), "k.input_scale": torch.tensor([0.3])})
    for name, expected in (("q.weight", 0.5), ("k.weight", 2.0)):
        weight, scale = read_fp8(reader, quant, name)
        assert torch.equal(weight.float(), q.float()) and scale.tolist() == [expected, expected]
    assert read_input_scale(reader, quant, ["q.weight", "k.weight"]).tolist() == pytest.approx([0.3])


def test_block_scales_are_requantized_per_row():
    quant = QuantizationConfig("fp8", "block", (2, 2), False, ())
    q = torch.full((4, 4), 64.0).to(E4M3)
    scales = torch.tensor([[1.0, 0.5], [0.25, 2.0]])  # [rows / 2, columns / 2]
    weight, scale = read_fp8(DictReader({"l.weight": q, "l.weight_scale_inv": scales}), quant, "l.weight", 1, 2, 4)
    full = (q.float() * scales.repeat_interleave(2, 0).repeat_interleave(2, 1))  # the dequantized weight
    torch.testing.assert_close(weight.float() * scale[:, None], full[:, 2:], rtol=0.07, atol=0)
    assert scale.tolist() == pytest.approx([64 / 448, 64 / 448, 128 / 448, 128 / 448])


def test_quantization_configs_of_published_checkpoints():
    static = QuantizationConfig.from_hf({"quant_method": "fp8", "activation_scheme": "static",
                                         "ignored_layers": ["lm_head"]})
    assert (static.weight_strategy, static.is_static_input) == ("tensor", True)
    assert static.scale_shapes("model.layers.0.mlp.down_proj.weight", (64, 128)) == {
        "model.layers.0.mlp.down_proj.weight_scale": frozenset({(), (1,)}),
        "model.layers.0.mlp.down_proj.input_scale": frozenset({(), (1,)})}
    block = QuantizationConfig.from_hf({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert block.scale_shapes("a.weight", (300, 256)) == {"a.weight_scale_inv": frozenset({(3, 2)})}
    ct = QuantizationConfig.from_hf({"quant_method": "compressed-tensors", "ignore": ["re:.*mlp.gate$"],
                                     "config_groups": {"g": {"targets": ["Linear"], "input_activations": None,
                                                             "weights": {"num_bits": 8, "type": "float",
                                                                         "strategy": "channel"}}}})
    assert ct.scale_shapes("x.o_proj.weight", (8, 4)) == {"x.o_proj.weight_scale": frozenset({(8, 1), (8,)})}
    assert not ct.is_prequantized("model.layers.3.mlp.gate.weight") and ct.is_prequantized("m.mlp.gate_proj.weight")


@pytest.mark.parametrize("hf, words", [
    ({"quant_method": "awq"}, ["'awq'", "fp8", "compressed-tensors"]),
    ({"quant_method": "fp8", "fmt": "e5m2"}, ["'e5m2'", "e4m3"]),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group"}}}}, ["num_bits", "4", "int"]),
])
def test_unsupported_quantization_configs_say_what_they_found(hf, words):
    with pytest.raises(ValueError) as err:
        QuantizationConfig.from_hf(hf)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_quantization_argument_and_flag():
    with pytest.raises(ValueError, match="quantization='int4'; choose fp8 or compressed-tensors"):
        EngineArgs(quantization="int4")
    import argparse
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli(parser.parse_args(["--quantization", "fp8"]))
    assert args.quantization == "fp8" and args.to_cli() == ["--quantization", "fp8"]
