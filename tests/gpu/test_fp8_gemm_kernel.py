"""The small-batch FP8-weight kernel (kernels/fp8_gemm_triton.py) against a float64 reference of
``x @ (w * scale)^T + bias``, with and without split-K, per-channel and per-tensor scales, odd
widths and K not a multiple of the tile; the CPU's weight-only arithmetic against the kernel; and
the kernel inside a CUDA graph.

Runs on a CUDA GPU. The kernel tests also run on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fp8_gemm_kernel.py

The interpreter rounds fp32 to bf16 by truncation where the GPU rounds to nearest, so its bf16
tolerance is one bf16 step wider.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels import fp8  # noqa: E402
from meshlm.kernels import fp8_gemm_triton, tuned_configs  # noqa: E402
from meshlm.kernels.fp8_gemm_triton import FP8GemmTiles, choose_tiles, fp8_weight_gemm  # noqa: E402

from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS

E4M3 = torch.float8_e4m3fn
# Relative tolerance of one output: the rounding to the output dtype (two steps: the fp32 sums of
# kernel and reference differ in order, and the interpreter truncates), fp32 sums of up to 600 terms.
RTOL = {torch.float32: 2e-5, torch.float16: 2 ** -9, torch.bfloat16: 2 ** -6 if IS_INTERPRETED else 2 ** -7}
# Tiles small enough for the interpreter, on every dtype.
SMALL = dict(block_n=16, block_k=64, num_stages=2)


def make_case(m: int, n: int, k: int, dtype: torch.dtype, per_channel: bool, has_bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    # float8 values over e4m3's whole range, subnormals to the largest (448)
    w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(E4M3).to(DEVICE)
    scale = (torch.rand(n if per_channel else 1, generator=gen) + 0.5) / 448
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype) if has_bias else None
    return x, w, scale.to(DEVICE), bias


def reference(x, w, scale, bias) -> torch.Tensor:
    """float64 ``x @ (w * scale)^T + bias``."""
    y = x.double() @ (w.double() * scale.double().reshape(-1, 1)).t()  # [M, N]
    return y if bias is None else y + bias.double()


def assert_matches_reference(got: torch.Tensor, x, w, scale, bias, what: str) -> None:
    expected = reference(x, w, scale, bias)
    assert got.shape == expected.shape and got.dtype == x.dtype, (what, got.shape, got.dtype)
    # A sum that cancels is small against its terms: its error is measured against the largest output.
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(got.double(), expected, rtol=RTOL[x.dtype], atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_kernel_matches_the_reference(dtype, m, split_k, swap_ab):
    # N = 37 channels (three tiles, the last partly filled), K = 300 (four 64-column tiles and a tail)
    x, w, scale, bias = make_case(m, 37, 300, dtype, per_channel=True, has_bias=False, seed=m)
    got = fp8_weight_gemm(x, w, scale, tiles=FP8GemmTiles(split_k=split_k, swap_ab=swap_ab, **SMALL))
    assert_matches_reference(got, x, w, scale, bias, f"{dtype} M={m} split_k={split_k} swap_ab={swap_ab}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("asm_widen", [True, False])
def test_every_float8_value_widens_exactly(dtype, asm_widen):
    """The weight holds each of the 254 float8 e4m3 values (subnormals, +-0, +-448; the two NaNs
    replaced by zeros) and x is the identity: the product is the weight, transposed, exactly."""
    codes = torch.arange(256, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] &= 0x80  # NaN -> +-0
    w = codes.to(torch.uint8).view(E4M3).reshape(16, 16).to(DEVICE)  # [N, K]
    x = torch.eye(16, dtype=dtype, device=DEVICE)
    tiles = FP8GemmTiles(block_n=16, block_k=16, split_k=1, num_stages=2, asm_widen=asm_widen)
    got = fp8_weight_gemm(x, w, torch.ones(1, device=DEVICE), tiles=tiles)
    assert torch.equal(got.float(), w.float().t()), (got.float() - w.float().t()).abs().max()


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("split_k, serial_reduce", [(1, True), (2, True), (2, False)])
def test_scales_and_bias(per_channel, has_bias, split_k, serial_reduce):
    x, w, scale, bias = make_case(3, 48, 256, torch.bfloat16, per_channel, has_bias, seed=7)
    tiles = FP8GemmTiles(split_k=split_k, serial_reduce=serial_reduce, **SMALL)
    got = fp8_weight_gemm(x, w, scale, bias, tiles=tiles)
    assert_matches_reference(got, x, w, scale, bias, f"per_channel={per_channel} bias={has_bias} {tiles}")


@pytest.mark.parametrize("serial_reduce", [True, False])
def test_split_k_launches_one_after_another(serial_reduce):
    """Each launch's splits are added up once and in full: the in-kernel reduction leaves its
    counts ready for the next launch (tiles of other shapes included)."""
    for i, (m, n) in enumerate([(2, 40), (2, 40), (5, 70), (2, 40)]):
        x, w, scale, bias = make_case(m, n, 640, torch.float32, per_channel=True, has_bias=True, seed=20 + i)
        tiles = FP8GemmTiles(split_k=4, serial_reduce=serial_reduce, **SMALL)
        assert_matches_reference(fp8_weight_gemm(x, w, scale, bias, tiles), x, w, scale, bias, f"launch {i}")


@pytest.mark.parametrize("m, n, k", [(1, 64, 2048), (7, 130, 520), (33, 20, 96)])
def test_default_launch_shape(m, n, k):
    """The launch shape choose_tiles picks (split-K on the first shape), rows past one 16-row tile."""
    dtype = torch.bfloat16
    x, w, scale, bias = make_case(m, n, k, dtype, per_channel=True, has_bias=True, seed=3)
    assert_matches_reference(fp8_weight_gemm(x, w, scale, bias), x, w, scale, bias, f"{m}x{n}x{k}")


def test_a_strided_x_and_empty_batch():
    x, w, scale, _ = make_case(4, 24, 128, torch.bfloat16, per_channel=True, has_bias=False)
    wide = torch.cat([x, x], dim=1)[:, :128]  # rows 256 elements apart
    assert_matches_reference(fp8_weight_gemm(wide, w, scale), x, w, scale, None, "strided x")
    assert fp8_weight_gemm(x[:0], w, scale).shape == (0, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_arithmetic_is_the_kernels(dtype):
    """fp8.weight_only_linear off the GPU computes what the kernel computes: the same float32 sums of
    exact products, scaled, biased and rounded once (they differ in the order of the sums only)."""
    x, w, scale, bias = make_case(5, 40, 384, dtype, per_channel=True, has_bias=True, seed=11)
    kernel = fp8_weight_gemm(x, w, scale, bias, tiles=FP8GemmTiles(split_k=2, **SMALL))
    cpu = fp8.weight_only_linear(x.cpu(), w.cpu(), scale.cpu(), bias.cpu())
    one_step = 2e-6 if dtype == torch.float32 else RTOL[dtype]
    torch.testing.assert_close(kernel.cpu().float(), cpu.float(), rtol=one_step, atol=1e-5 * float(cpu.abs().max()))


def test_launch_rule_splits_k_only_for_few_column_tiles():
    num_sms = 132
    wide = choose_tiles(1, 28672, 4096, torch.bfloat16, num_sms)  # gate_up of an 8B model
    assert wide.split_k == 1 and 28672 // wide.block_n >= num_sms
    narrow = choose_tiles(1, 768, 4096, torch.bfloat16, num_sms)  # qkv at tp=8: 48 tiles of 16 channels
    assert narrow.split_k > 1 and 4096 // narrow.split_k >= 1024
    assert choose_tiles(1, 768, 1024, torch.bfloat16, num_sms).split_k == 1  # too short a K to split
    for m in (1, 16, 64):
        t = choose_tiles(m, 4096, 14336, torch.bfloat16, num_sms)  # down_proj: 64 column tiles
        stage = max(16, m) * t.block_k * 2 + t.block_n * t.block_k
        assert t.num_stages * stage <= 100 * 1024, (m, t)
        assert t.split_k > 1 and (14336 // t.block_k) % t.split_k == 0, t  # K's tiles cut evenly


@pytest.mark.parametrize("split_k", [1, 3])
def test_weight_in_the_activations_dtype_is_used_as_it_is(split_k):
    """A bf16 weight (nothing to widen, no scale): the float32 sums of x @ w^T, rounded once."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 384, generator=gen).to(torch.bfloat16)
    w = (torch.randn(80, 384, generator=gen) * 0.05).to(torch.bfloat16)
    out = fp8_weight_gemm(x.to(DEVICE), w.to(DEVICE), None, tiles=FP8GemmTiles(split_k=split_k, **SMALL))
    expected = (x.float() @ w.float().t()).to(torch.bfloat16)
    torch.testing.assert_close(out.cpu(), expected, rtol=RTOL[torch.bfloat16], atol=1e-3)


def _recorded_launch_shapes() -> list[tuple[str, dict]]:
    """Every launch shape the shipped per-card files record, once each: (file name, tiles)."""
    shapes = {}
    for path in sorted(tuned_configs.CONFIG_DIR.glob("*.json")):
        for entry in json.loads(path.read_text())["entries"]:
            shapes.setdefault(json.dumps(entry["tiles"], sort_keys=True), path.name)
    return [(name, json.loads(tiles)) for tiles, name in shapes.items()]


@pytest.mark.parametrize("name,tiles", _recorded_launch_shapes(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_recorded_launch_shapes_compute_the_product(name, tiles):
    """Each launch shape a sweep recorded for a card (the engine runs them there) gives the product,
    for the weight dtype its file serves: float8 with per-channel scales, or 16-bit as it is. K
    spans at least two tiles of every split, so that split-K reduces real partial sums."""
    tiles = FP8GemmTiles(**tiles)
    k = 2 * tiles.block_k * tiles.split_k
    if name.startswith("bf16_weight_gemm"):
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(1, k, generator=gen).to(DEVICE, torch.bfloat16)
        w = (torch.randn(2 * tiles.block_n, k, generator=gen) * 0.05).to(DEVICE, torch.bfloat16)
        got = fp8_weight_gemm(x, w, None, tiles=tiles)
        expected = (x.double() @ w.double().t())
        torch.testing.assert_close(got.double(), expected, rtol=RTOL[torch.bfloat16],
                                   atol=1e-5 * float(expected.abs().max()))
    else:
        x, w, scale, bias = make_case(1, 2 * tiles.block_n, k, torch.bfloat16, True, False, seed=8)
        assert_matches_reference(fp8_weight_gemm(x, w, scale, tiles=tiles), x, w, scale, bias, f"{name} {tiles}")


def test_recorded_launch_shape_wins_over_the_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned_configs, "CONFIG_DIR", tmp_path)
    tuned_configs._entries.cache_clear()
    recorded = FP8GemmTiles(block_n=32, block_k=128, split_k=8, num_warps=2, swap_ab=True)
    path = tuned_configs.config_path(tuned_configs.small_batch_gemm_config(torch.float8_e4m3fn), "Card X-1")
    path.write_text(json.dumps({"entries": [{"n": 4096, "k": 14336, "max_rows": 4,
                                             "tiles": dataclasses.asdict(recorded)}]}))
    try:
        assert choose_tiles(2, 4096, 14336, torch.bfloat16, 132, "Card X-1") == recorded
        rule = choose_tiles(2, 4096, 14336, torch.bfloat16, 132)
        assert rule != recorded
        assert choose_tiles(8, 4096, 14336, torch.bfloat16, 132, "Card X-1") == choose_tiles(
            8, 4096, 14336, torch.bfloat16, 132)  # past the entry's rows: the rule
        assert choose_tiles(2, 4096, 14336, torch.float32, 132, "Card X-1").block_n == 16  # fp32 keeps its rule
        assert choose_tiles(2, 4096, 14336, torch.bfloat16, 132, "Card X-1", torch.bfloat16) == rule  # a bf16 weight
    finally:
        tuned_configs._entries.cache_clear()


@needs_cuda
@pytest.mark.parametrize("split_k, serial_reduce", [(1, True), (4, True), (4, False)])
def test_kernel_in_a_cuda_graph(split_k, serial_reduce):
    x, w, scale, bias = make_case(4, 4096, 4096, torch.bfloat16, per_channel=True, has_bias=True)
    tiles = FP8GemmTiles(block_n=64, block_k=256, split_k=split_k, serial_reduce=serial_reduce)
    fp8_weight_gemm(x, w, scale, bias, tiles)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_weight_gemm(x, w, scale, bias, tiles)
    for replay in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(9 + replay)).to(DEVICE, x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fp8_weight_gemm(x, w, scale, bias, tiles)), replay  # and deterministic
        assert_matches_reference(out, x, w, scale, bias, f"graph {tiles} replay {replay}")


@needs_cuda
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_llama_8b_shapes_with_the_default_launch_shape(n, k, m):
    """Llama-3-8B's weights (split-K on all SMs for the narrow ones; one row by the one-row product
    where the card recorded it, kernels/gemv_triton.py); both ways of widening the weight give the
    same bits."""
    x, w, scale, bias = make_case(m, n, k, torch.bfloat16, per_channel=True, has_bias=False, seed=n + m)
    got = fp8_weight_gemm(x, w, scale)
    assert_matches_reference(got, x, w, scale, None, f"{m}x{n}x{k}")
    tiles = choose_tiles(m, n, k, x.dtype, torch.cuda.get_device_properties(0).multi_processor_count,
                         tuned_configs.device_name(x.device))  # the default's: a recorded one where there is
    named = fp8_weight_gemm(x, w, scale, tiles=tiles)  # the small-batch product, whatever the rows
    assert_matches_reference(named, x, w, scale, None, f"{m}x{n}x{k} {tiles}")
    assert torch.equal(named, fp8_weight_gemm(x, w, scale, tiles=dataclasses.replace(tiles, asm_widen=False)))


@needs_cuda
def test_small_batches_take_the_kernel_on_the_gpu():
    x, w, scale, bias = make_case(fp8.WEIGHT_ONLY_MAX_ROWS, 512, 1024, torch.bfloat16, per_channel=True, has_bias=True)
    got = fp8.fp8_linear(x, w, scale, bias)
    assert torch.equal(got, fp8_weight_gemm(x, w, scale, bias))


@needs_cuda
def test_16_bit_linear_takes_the_kernel_only_where_a_sweep_recorded_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned_configs, "CONFIG_DIR", tmp_path)
    tuned_configs._entries.cache_clear()
    calls = []
    monkeypatch.setattr(fp8_gemm_triton, "fp8_weight_gemm", lambda *args, **kw: calls.append(args[0].shape)
                        or fp8_weight_gemm(*args, **kw))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4096, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(512, 4096, generator=gen) * 0.02).to(DEVICE, torch.bfloat16)
    try:
        assert torch.equal(fp8.linear(x, w), torch.nn.functional.linear(x, w)) and not calls  # nothing recorded
        tiles = FP8GemmTiles(block_n=32, block_k=256, split_k=2)
        name = tuned_configs.small_batch_gemm_config(torch.bfloat16)
        tuned_configs.config_path(name, tuned_configs.device_name(x.device)).write_text(json.dumps(
            {"entries": [{"n": 512, "k": 4096, "max_rows": 4, "tiles": dataclasses.asdict(tiles)}]}))
        tuned_configs._entries.cache_clear()
        assert torch.equal(fp8.linear(x, w), fp8_weight_gemm(x, w, None, tiles=tiles)) and calls == [(2, 4096)]
        fp8.linear(x.repeat(3, 1), w)  # 6 rows: past the entry's 4
        assert calls == [(2, 4096)]
    finally:
        tuned_configs._entries.cache_clear()


@pytest.mark.parametrize("weight_dtype", [E4M3, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 320), (5, 300)])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gated_product_is_silu_and_mul_then_the_product(weight_dtype, m, k, split_k):
    """x = [gate | up] taken through SiLU-and-mul as the kernel loads it: bitwise the SiLU-and-mul
    kernel's rows times the weight (K = 320: whole tiles; 300: a tail; one and three splits)."""
    from meshlm.kernels.fused_ops import TritonOps
    gen = torch.Generator().manual_seed(k + m)
    gate_up = (torch.randn(m, 2 * k, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    _, w, scale, _ = make_case(m, 37, k, torch.bfloat16, per_channel=True, has_bias=False, seed=m)
    if weight_dtype == torch.bfloat16:
        w, scale = (w.float() * scale.reshape(-1, 1)).to(torch.bfloat16), None
    tiles = FP8GemmTiles(split_k=split_k, **SMALL)
    got = fp8_weight_gemm(gate_up, w, scale, tiles=tiles, gated=True)
    unfused = fp8_weight_gemm(TritonOps().silu_and_mul(gate_up), w, scale, tiles=tiles)
    assert got.shape == (m, 37) and torch.equal(got, unfused)
    plain = fp8_weight_gemm(gate_up[:, :k].contiguous(), w, scale, tiles=tiles)  # the gate alone differs
    assert not torch.equal(got, plain)


@needs_cuda
@pytest.mark.parametrize("quantized", [False, True])
def test_the_down_projection_fuses_silu_only_where_the_small_batch_kernel_runs(quantized, monkeypatch):
    """silu_and_mul_linear runs the gated kernel for a float8 weight's small batches (and a 16-bit
    weight the recorded shapes name), and answers None past them or with the fusion off."""
    gen = torch.Generator().manual_seed(9)
    w = (torch.randn(256, 512, generator=gen) * 0.05).to(DEVICE)
    w, scale = fp8.quantize_per_row(w) if quantized else (w.to(torch.bfloat16), None)
    scale = None if scale is None else scale[:, 0]
    gate_up = torch.randn(2, 1024, generator=gen).to(DEVICE, torch.bfloat16)
    assert fp8.silu_and_mul_linear(gate_up, w, scale) is None  # off by default
    monkeypatch.setitem(fp8._FUSED_SILU_PRODUCT, "enabled", True)
    got = fp8.silu_and_mul_linear(gate_up, w, scale)
    if not quantized:  # no launch shape recorded for 256 x 512: cuBLAS runs it, unfused
        assert got is None
        return
    from meshlm.kernels.fused_ops import TritonOps
    assert torch.equal(got, fp8.linear(TritonOps().silu_and_mul(gate_up), w, scale))
    many = gate_up.repeat(fp8.WEIGHT_ONLY_MAX_ROWS, 1)  # past the weight-only rows
    assert fp8.silu_and_mul_linear(many, w, scale) is None
