"""The two largest parts of a long-prompt step on one GPU, timed apart: the model's matrix products
at the row counts steps take, and the attention of a mixed step (decodes beside prompt chunks).

    python3 benchmarks/step_parts.py [--rows 2048,6400,8192,16384] [--decodes 256x2048]
        [--prompts 3x2048] [--out parts.json]

1. GEMMs: Llama-3-8B's four linear layers (QKV 6144 x 4096, output 4096 x 4096, gate/up
   28672 x 4096, down 4096 x 14336; bf16, ``F.linear`` as the model calls it) at each row count,
   through torch's default BLAS library and through cuBLASLt
   (``torch.backends.cuda.preferred_blas_library``), in TFLOP/s and per cent of a bf16 8192^3
   matmul timed in the same run; then each row count's whole layer (the four products) the same
   way. A step's rows are its decodes plus its prompt tokens, so the table says what a step size
   costs in matrix rate.
2. Attention of a mixed step: ``--decodes`` (batch x context) by the decode kernel and
   ``--prompts`` (count x length, fresh prompts) by the prefill kernel, each alone, one after the
   other on one stream (as the engine runs them), and on two streams at once; the decodes' bytes
   against the copy rate, the prompts' FLOPs against the matmul rate.

Each timing is the median of CUDA-event times after a warm-up. Prints one table per part.
``--sustained`` instead runs the four products at 6400 rows, whole and cut into row pieces, back
to back for a while each (the clocks under a long run of steps), in interleaved rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_bench as bench  # noqa: E402  (puts the repository on the path)
from meshlm.kernels.decode_attention import paged_decode_attention  # noqa: E402
from meshlm.kernels.prefill_attention import prefill_attention  # noqa: E402
from meshlm.kernels.prefill_tiles import prefill_tiles  # noqa: E402

# (name, output features, input features) of Llama-3-8B's linear layers.
LAYERS = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
BACKENDS = ("default", "cublaslt")


def gemm_rows(rows: list[int], matmul_rate: float) -> list[dict]:
    """Per backend, row count and layer: milliseconds and TFLOP/s of one ``F.linear``."""
    weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for name, n, k in LAYERS}
    results = []
    for backend in BACKENDS:
        torch.backends.cuda.preferred_blas_library("cublaslt" if backend == "cublaslt" else "default")
        for m in rows:
            layer_ms, layer_flop = 0.0, 0
            for name, n, k in LAYERS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ms = bench.median_ms(lambda: F.linear(x, weights[name]), iters=20)
                flop = 2 * m * n * k
                layer_ms, layer_flop = layer_ms + ms, layer_flop + flop
                results.append(dict(backend=backend, rows=m, layer=name, ms=ms, tflop_s=flop / ms / 1e9))
            results.append(dict(backend=backend, rows=m, layer="all four", ms=layer_ms,
                                tflop_s=layer_flop / layer_ms / 1e9))
    torch.backends.cuda.preferred_blas_library("default")
    print(f"\nGEMMs (F.linear, bf16), TFLOP/s and per cent of the 8192^3 matmul's {matmul_rate:.0f}:")
    names = [name for name, _, _ in LAYERS] + ["all four"]
    print(f"{'backend':<10}{'rows':>7}" + "".join(f"{name:>18}" for name in names))
    for backend in BACKENDS:
        for m in rows:
            cells = {r["layer"]: r for r in results if r["backend"] == backend and r["rows"] == m}
            print(f"{backend:<10}{m:>7}" + "".join(
                f"{cells[name]['tflop_s']:>10.0f} {100 * cells[name]['tflop_s'] / matmul_rate:>5.1f} %"
                for name in names))
    return results


def mixed_attention(decodes: tuple[int, int], prompts: tuple[int, int], copy_rate: float,
                    matmul_rate: float) -> list[dict]:
    """The decodes and the prompts' chunks alone, one after the other, and on two streams."""
    batch, context = decodes
    q_d, k_d, v_d, meta_d, _, _ = bench.make_batch(batch, context, 1)
    count, length = prompts
    q_p, k_p, v_p, meta_p, _, _ = bench.make_batch(count, length, length)
    new_kv = bench.step_kv(k_p, v_p, meta_p)
    tiles = prefill_tiles(bench.HEAD_DIM, bench.GROUP, q_p.dtype)
    side = torch.cuda.Stream()

    def run_decodes():
        return paged_decode_attention(q_d, k_d, v_d, meta_d, bench.SCALE)

    def run_prompts():
        return prefill_attention(q_p, k_p, v_p, meta_p, bench.SCALE, tiles, new_kv=new_kv)

    def one_stream():
        run_decodes()
        run_prompts()

    def two_streams():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            run_decodes()
        run_prompts()
        main.wait_stream(side)

    decode_bytes = bench.decode_bytes(batch, context, k_d)
    flop = count * 4 * bench.NUM_HEADS * bench.HEAD_DIM * length * (length + 1) // 2
    rows = []
    for name, fn in (("decodes", run_decodes), ("prompts", run_prompts), ("one stream", one_stream),
                     ("two streams", two_streams)):
        ms = bench.median_ms(fn, iters=30)
        rows.append(dict(run=name, us=ms * 1e3))
    print(f"\nAttention of a mixed step: {batch} decodes of {context} keys ({decode_bytes / 1e9:.2f} GB) and "
          f"{count} prompts of {length} ({flop / 1e12:.3f} TFLOP); copy {copy_rate:.2f} TB/s, "
          f"matmul {matmul_rate:.0f} TFLOP/s")
    alone = rows[0]["us"] + rows[1]["us"]
    for row in rows:
        if row["run"] == "decodes":
            rate = decode_bytes / row["us"] / 1e6
            note = f"{rate:.2f} TB/s, {100 * rate / copy_rate:.1f} %"
        elif row["run"] == "prompts":
            note = f"{flop / row['us'] / 1e6:.0f} TFLOP/s, {100 * flop / row['us'] / 1e6 / matmul_rate:.1f} %"
        else:
            note = f"{100 * row['us'] / alone:.1f} % of the two apart"
        print(f"{row['run']:<14}{row['us']:>10.1f} us   {note}")
    return rows


# Ways to multiply one step's rows: whole, or cut into pieces that run one after another.
ROW_PIECES = {"whole": (6400,), "2 x 3200": (3200, 3200), "4096 + 2304": (4096, 2304),
              "3 x 2048 + 256": (2048, 2048, 2048, 256), "4 x 1600": (1600,) * 4}


def sustained_pieces(rounds: int = 5, seconds: float = 0.5) -> list[dict]:
    """``--sustained``: the whole layer's four products at a step's 6400 rows, whole and cut into row
    pieces (``ROW_PIECES``), each run back to back for ``seconds`` (the clocks a long run of steps
    holds, not a short burst's) in interleaved rounds; TFLOP/s, median of the rounds."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _, n, k in LAYERS]
    inputs = {k: torch.randn(6400, k, device="cuda", dtype=torch.bfloat16) for _, _, k in LAYERS}
    flop = sum(2 * 6400 * n * k for _, n, k in LAYERS)

    def layer(pieces):
        for weight in weights:
            start = 0
            for rows in pieces:
                F.linear(inputs[weight.shape[1]][start:start + rows], weight)
                start += rows

    rates = {name: [] for name in ROW_PIECES}
    for _ in range(rounds):
        for name, pieces in ROW_PIECES.items():
            layer(pieces)
            torch.cuda.synchronize()
            calls, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < seconds:
                layer(pieces)
                calls += 1
                if calls % 8 == 0:
                    torch.cuda.synchronize()
            torch.cuda.synchronize()
            rates[name].append(calls * flop / (time.perf_counter() - begin) / 1e12)
    print(f"\nThe four products at 6400 rows, whole and in row pieces, each run back to back for {seconds} s, "
          f"{rounds} interleaved rounds (TFLOP/s, median and range):")
    rows = []
    for name, values in rates.items():
        values.sort()
        rows.append(dict(pieces=name, tflop_s=values[len(values) // 2], low=values[0], high=values[-1]))
        print(f"{name:<14}{values[len(values) // 2]:>8.0f}   ({values[0]:.0f}-{values[-1]:.0f})")
    return rows


def pair(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="256,2048,4096,4224,6144,6400,8192,8448,12288,16384")
    parser.add_argument("--decodes", default="256x2048")
    parser.add_argument("--prompts", default="3x2048")
    parser.add_argument("--sustained", action="store_true",
                        help="only the products at 6400 rows, whole and in row pieces, under sustained load")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    if opts.sustained:
        sustained_pieces()
        return
    copy_rate, matmul_rate = bench.copy_tb_s(), bench.matmul_tflop_s()
    print(f"{torch.cuda.get_device_name()}: copy {copy_rate:.2f} TB/s, bf16 8192^3 {matmul_rate:.0f} TFLOP/s")
    gemms = gemm_rows([int(m) for m in opts.rows.split(",")], matmul_rate)
    attention = mixed_attention(pair(opts.decodes), pair(opts.prompts), copy_rate, matmul_rate)
    if opts.out:
        Path(opts.out).write_text(json.dumps(dict(card=torch.cuda.get_device_name(), copy_tb_s=copy_rate,
                                                  matmul_tflop_s=matmul_rate, gemms=gemms, attention=attention),
                                             indent=1))


if __name__ == "__main__":
    main()
