"""The fused Triton kernels (TritonOps) against the unfused torch ops, inside CUDA graphs, and
through the engine with ``enable_fused_kernels=True``.

Runs on a CUDA GPU. The kernel tests also run on the CPU in Triton's interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fused_ops_gpu.py

The interpreter rounds fp32 to bf16 by truncation where the GPU rounds to nearest, so its bf16
tolerance is one bf16 step wider. The kernels that write float8 rows: test_fused_ops_fp8_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from meshlm.kernels.attention import RotaryEmbedding  # noqa: E402
from meshlm.kernels.fused_ops import TORCH_OPS  # noqa: E402

from tests.gpu.fused_ops_cases import DTYPES, EPS, TRITON_OPS, assert_close, randn  # noqa: E402
from tests.gpu.kernel_device import DEVICE, IS_INTERPRETED, KERNEL_MARKS, needs_cuda  # noqa: E402

pytestmark = KERNEL_MARKS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("hidden", [64, 1000, 4096])
def test_add_rms_norm(dtype, num_tokens, hidden):
    # x is a column slice of a wider tensor: rows with a stride, as a sliced projection gives.
    x = randn(num_tokens, hidden + 64, dtype=dtype, scale=2.0)[:, :hidden]
    residual = randn(num_tokens, hidden, dtype=dtype, seed=1, scale=5.0)
    weight = randn(hidden, dtype=dtype, seed=2) + 1
    normed, new_residual = TRITON_OPS.add_rms_norm(x, residual, weight, EPS)
    exp_normed, exp_residual = TORCH_OPS.add_rms_norm(x, residual, weight, EPS)
    if IS_INTERPRETED and dtype == torch.bfloat16:
        assert_close(new_residual, exp_residual, f"residual {dtype} {num_tokens}x{hidden}")
    else:  # the same fp32 sum, rounded the same way
        assert torch.equal(new_residual, exp_residual)
    assert_close(normed, exp_normed, f"normed {dtype} {num_tokens}x{hidden}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7])
def test_rms_norm_without_residual(dtype, num_tokens):
    x = randn(num_tokens, 4096, dtype=dtype, scale=3.0)
    weight = randn(4096, dtype=dtype, seed=2)
    normed, residual = TRITON_OPS.add_rms_norm(x, None, weight, EPS)
    assert residual is x
    assert_close(normed, TORCH_OPS.rms_norm(x, weight, EPS), f"{dtype}")
    assert_close(TRITON_OPS.rms_norm(x, weight, EPS), TORCH_OPS.rms_norm(x, weight, EPS), f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_view(dtype):
    """Qwen3's qk-norm: [tokens, heads, head_dim] taken out of the merged qkv row."""
    qkv = randn(7, 16 * 128, dtype=dtype)
    q = qkv[:, :8 * 128].view(7, 8, 128)
    weight = randn(128, dtype=dtype, seed=3)
    assert_close(TRITON_OPS.rms_norm(q, weight, EPS), TORCH_OPS.rms_norm(q, weight, EPS), f"{dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 64])
@pytest.mark.parametrize("inter", [64, 1000, 14336])
def test_silu_and_mul(dtype, num_tokens, inter):
    gate_up = randn(num_tokens, 2 * inter, dtype=dtype, scale=3.0)
    assert_close(TRITON_OPS.silu_and_mul(gate_up), TORCH_OPS.silu_and_mul(gate_up),
                 f"{dtype} {num_tokens}x{inter}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 2, 24)])
def test_rotary(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, scaling, torch.device(DEVICE))
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, _ = randn(num_tokens, sum(sizes), dtype=dtype, scale=2.0).split(sizes, dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # strided views, as the attention layer has them
    k = k.view(num_tokens, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(4)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    got_q, got_k = TRITON_OPS.rotary(positions, q, k, rotary.cos, rotary.sin)
    exp_q, exp_k = TORCH_OPS.rotary(positions, q, k, rotary.cos, rotary.sin)
    assert_close(got_q, exp_q, f"q {dtype}")
    assert_close(got_k, exp_k, f"k {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (4, 2, 24)])
def test_rotary_and_cache(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    """The fused rotary + KV-cache store against rotary then the two index copies: the rotated q,
    and the whole cache (slots this step does not own must keep their old values)."""
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = randn(num_tokens, sum(sizes), dtype=dtype, scale=2.0).split(sizes, dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # strided views of the merged qkv row
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    gen = torch.Generator().manual_seed(5)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    num_blocks, block_size = 9, 16
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    cache = randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=6)
    got_caches, exp_caches = cache.clone(), cache.clone()
    got_q = TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, got_caches[0],
                                        got_caches[1], slots)
    exp_q = TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, exp_caches[0],
                                       exp_caches[1], slots)
    assert_close(got_q, exp_q, f"q {dtype}")
    assert_close(got_caches[0], exp_caches[0], f"k cache {dtype}")
    assert torch.equal(got_caches[1], exp_caches[1]), "values are stored unchanged"
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert torch.equal(got_caches[0].view(-1, num_kv_heads, head_dim)[untouched],
                       cache[0].view(-1, num_kv_heads, head_dim)[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_and_cache_keeps_the_rotated_keys_when_asked(dtype):
    """With ``k_out`` the fused kernel also stores the rotated keys there (the prefill kernel reads a
    step's own keys from them): against the plain torch rotary, and the cache as without k_out."""
    num_tokens, num_heads, num_kv_heads, head_dim = 7, 9, 3, 64
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    q, k, v = randn(num_tokens, sum(sizes), dtype=dtype, scale=2.0).split(sizes, dim=-1)
    q, k, v = (x.view(num_tokens, -1, head_dim) for x in (q, k, v))  # views of the merged qkv row
    positions = torch.tensor([0, 3, 70, 71, 900, 2048, 4095], device=DEVICE)
    slots = torch.tensor([5, 17, 16, 40, 2, 63, 30], device=DEVICE)
    got = randn(2, 4, 16, num_kv_heads, head_dim, dtype=dtype, seed=3)  # [k and v, blocks, block size, heads, dim]
    expected = got.clone()
    k_out = torch.full((num_tokens, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, got[0], got[1], slots, k_out=k_out)
    TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, expected[0], expected[1], slots)
    assert_close(k_out, TORCH_OPS.rotary(positions, q, k, rotary.cos, rotary.sin)[1], f"k_out {dtype}")
    assert_close(got, expected, f"caches {dtype}")


def test_rotary_and_cache_catches_a_misplaced_slot():
    """The cache comparison can fail: one token stored one slot off is seen."""
    rotary = RotaryEmbedding(64, 128, 10000.0, None, torch.device(DEVICE))
    q, k, v = randn(3, 4, 64), randn(3, 2, 64, seed=1), randn(3, 2, 64, seed=2)
    positions = torch.tensor([0, 5, 9], device=DEVICE)
    got, expected = torch.zeros(2, 4, 16, 2, 64, device=DEVICE), torch.zeros(2, 4, 16, 2, 64, device=DEVICE)
    TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, got[0], got[1],
                                torch.tensor([3, 17, 40], device=DEVICE))
    TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, expected[0], expected[1],
                               torch.tensor([3, 17, 41], device=DEVICE))
    assert not torch.equal(got, expected)


def test_kernels_catch_a_wrong_answer():
    """The comparisons above can fail: a weight off by one part in a thousand is seen."""
    x, weight = randn(7, 256), randn(256, seed=2) + 1
    with pytest.raises(AssertionError):
        assert_close(TRITON_OPS.rms_norm(x, weight * 1.001, EPS), TORCH_OPS.rms_norm(x, weight, EPS), "fp32")


# --- CUDA graphs ----------------------------------------------------------------------------------

def _layer_ops(ops, x, residual, gate_up, q, k, positions, rotary, weight):
    normed, residual = ops.add_rms_norm(x, residual, weight, EPS)
    q_rot, k_rot = ops.rotary(positions, q, k, rotary.cos, rotary.sin)
    return normed, residual, ops.silu_and_mul(gate_up), q_rot, k_rot


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_replay_in_a_cuda_graph(dtype):
    """Captured once, replayed on new inputs copied into the captured buffers."""
    num_tokens, hidden, inter, num_heads, num_kv_heads, head_dim = 8, 4096, 14336, 32, 8, 128
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    weight = randn(hidden, dtype=dtype, seed=9)

    def inputs(seed):
        return (randn(num_tokens, hidden, dtype=dtype, seed=seed),
                randn(num_tokens, hidden, dtype=dtype, seed=seed + 1),
                randn(num_tokens, 2 * inter, dtype=dtype, seed=seed + 2),
                randn(num_tokens, num_heads, head_dim, dtype=dtype, seed=seed + 3),
                randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, seed=seed + 4),
                torch.randint(0, 4096, (num_tokens,), generator=torch.Generator().manual_seed(seed)).to(DEVICE))

    static = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        _layer_ops(TRITON_OPS, *static, rotary, weight)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _layer_ops(TRITON_OPS, *static, rotary, weight)
    for seed in (10, 20):
        fresh = inputs(seed)
        for buffer, value in zip(static, fresh):
            buffer.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        expected = _layer_ops(TORCH_OPS, *fresh, rotary, weight)
        for name, got, exp in zip(("normed", "residual", "silu_and_mul", "q", "k"), outputs, expected):
            assert_close(got, exp, f"{name} {dtype} after replay {seed}")


@needs_cuda
def test_rotary_and_cache_replays_in_a_cuda_graph():
    """Captured once; each replay rotates new q/k and stores them at new slots of the same cache."""
    dtype, num_tokens, num_heads, num_kv_heads, head_dim = torch.bfloat16, 8, 32, 8, 128
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None, torch.device(DEVICE))
    q, k, v = (randn(num_tokens, h, head_dim, dtype=dtype, seed=s) for s, h in
               ((0, num_heads), (1, num_kv_heads), (2, num_kv_heads)))
    positions = torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE)
    slots = torch.arange(num_tokens, dtype=torch.int64, device=DEVICE)
    caches = torch.zeros(2, 16, 16, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, caches[0], caches[1], slots)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out = TRITON_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, caches[0], caches[1], slots)
    expected_caches = caches.clone()
    for seed in (10, 20):
        gen = torch.Generator().manual_seed(seed)
        for buffer, fresh in ((q, randn(*q.shape, dtype=dtype, seed=seed)),
                              (k, randn(*k.shape, dtype=dtype, seed=seed + 1)),
                              (v, randn(*v.shape, dtype=dtype, seed=seed + 2)),
                              (positions, torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)),
                              (slots, torch.randperm(256, generator=gen)[:num_tokens].to(DEVICE))):
            buffer.copy_(fresh)
        graph.replay()
        expected_q = TORCH_OPS.rotary_and_cache(positions, q, k, v, rotary.cos, rotary.sin, expected_caches[0],
                                                expected_caches[1], slots)
        torch.cuda.synchronize()
        assert_close(q_out, expected_q, f"q after replay {seed}")
        assert_close(caches, expected_caches, f"caches after replay {seed}")


# --- the engine -----------------------------------------------------------------------------------

PROMPTS = [[5, 17, 33, 91, 4], list(range(10, 80)), [7] * 23]
STEPS = 16


def _generate(path, dtype, enable_fused_kernels):
    from meshlm import LLM, SamplingParams
    llm = LLM(str(path), device="cuda", dtype=dtype, block_size=16, max_model_len=256, num_kv_blocks=128,
              max_batch_size=4, enable_fused_kernels=enable_fused_kernels)
    engine = llm.local_model_runner()
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=5)
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    ops_name = engine.model.ops.name
    replays = engine.graph_runner.num_replays if engine.graph_runner is not None else 0
    llm.shutdown()
    return outs, ops_name, replays


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_dir(request, tmp_path_factory):
    from tests.model_factory import make_random_model
    overrides = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    if request.param == "qwen3":
        overrides["head_dim"] = 64
    return make_random_model(tmp_path_factory.mktemp(request.param), request.param, weight_std=0.2, **overrides)


@needs_cuda
def test_engine_fused_and_unfused_agree(model_dir):
    plain, plain_ops, _ = _generate(model_dir, "float32", False)
    fused, fused_ops, replays = _generate(model_dir, "float32", True)
    assert (plain_ops, fused_ops) == ("torch", "triton")
    assert replays > 0, "decode steps did not replay the CUDA graphs"
    for p, f in zip(plain, fused):
        assert f.token_ids == p.token_ids
        for step_p, step_f in zip(p.logprobs, f.logprobs):
            for token in set(step_p) & set(step_f):
                assert abs(step_f[token] - step_p[token]) < 1e-3, (token, step_f[token], step_p[token])
