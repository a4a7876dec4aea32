"""A PNG of a benchmark: the latency distributions (histogram and CDF of TTFT, TPOT, ITL, E2E) and,
after a concurrency sweep, throughput and median latencies against concurrency."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from meshlm.bench.metrics import LATENCIES

_TITLES = {"ttft_ms": "TTFT (ms)", "tpot_ms": "TPOT (ms)", "itl_ms": "ITL (ms)", "e2e_ms": "E2E latency (ms)"}


def _latency_panel(ax, values: list[float], name: str) -> None:
    ax.set_title(_TITLES[name])
    if not values:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    arr = np.sort(np.asarray(values, dtype=np.float64))
    ax.hist(arr, bins=int(np.clip(len(arr) // 2, 5, 60)), color="tab:blue", alpha=0.6)
    ax.set_ylabel("requests" if name != "itl_ms" else "gaps")
    cdf = ax.twinx()
    cdf.step(arr, np.arange(1, len(arr) + 1) / len(arr), where="post", color="tab:red")
    ax.ticklabel_format(axis="x", useOffset=False)
    cdf.set_ylim(0, 1.02)
    cdf.set_ylabel("CDF")
    for p, style in ((50, "--"), (99, ":")):
        ax.axvline(float(np.percentile(arr, p)), color="black", linestyle=style, label=f"p{p}")
    ax.legend(loc="center right", fontsize="small")


def _sweep_panels(ax_tput, ax_lat, sweep: list[dict]) -> None:
    x = np.arange(len(sweep))
    labels = ["inf" if p["max_concurrency"] is None else str(p["max_concurrency"]) for p in sweep]
    out = [p["output_throughput"] or 0.0 for p in sweep]
    ax_tput.plot(x, out, marker="o", label="output tok/s")
    ax_tput.plot(x, [p["total_token_throughput"] or 0.0 for p in sweep], marker="s", label="total tok/s")
    ax_tput.set_title("Throughput vs concurrency")
    ax_tput.set_ylabel("tokens/s")
    ax_tput.legend(fontsize="small")
    for name, marker in (("ttft_ms", "o"), ("tpot_ms", "s"), ("itl_ms", "^")):
        values = [np.nan if p[name]["p50"] is None else p[name]["p50"] for p in sweep]
        ax_lat.plot(x, values, marker=marker, label=f"{name[:-3].upper()} p50")
    ax_lat.set_title("Median latency vs concurrency")
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_lat.legend(fontsize="small")
    for ax in (ax_tput, ax_lat):
        ax.set_xticks(x, labels)
        ax.set_xlabel("max concurrency")


def plot_result(path: str | Path, samples_ms: dict[str, list[float]], sweep: list[dict] | None,
                title: str) -> None:
    """Write the PNG; ``samples_ms`` maps each of LATENCIES to its raw samples in milliseconds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 3 if sweep else 2
    fig = Figure(figsize=(12, 4 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2)
    for ax, name in zip(axes[:2].flat, LATENCIES):
        _latency_panel(ax, samples_ms.get(name, []), name)
    if sweep:
        _sweep_panels(axes[2][0], axes[2][1], sweep)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
