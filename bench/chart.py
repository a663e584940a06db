"""One PNG with the run's figures, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes

from bench.report import Result, ceiling


def _by_concurrency(result: Result, kind: str, workers: int) -> list[Result]:
    cells = [c for c in result["cells"] if c["kind"] == kind and c["workers"] == workers]
    return sorted(cells, key=lambda c: c["concurrency"])


def _series(result: Result) -> list[tuple[str, list[Result]]]:
    """The closed-loop sweeps: single, then each pool size."""
    sizes = sorted({c["workers"] for c in result["cells"] if c["kind"] == "pool"})
    return [("single", _by_concurrency(result, "single", 1))] + [
        (f"pool N={n}", _by_concurrency(result, "pool", n)) for n in sizes
    ]


def _throughput(ax: Axes, result: Result) -> None:
    for name, cells in _series(result):
        ax.plot([c["concurrency"] for c in cells], [c["audio_per_s"] for c in cells], marker="o", label=name)
    top = max(c["workers"] for c in result["cells"] if c["kind"] == "pool")
    threads = next(c["threads"] for c in result["cells"] if c["kind"] == "pool" and c["workers"] == top)
    roof = ceiling(result, top, threads)
    if roof:
        ax.axhline(roof["audio_per_s"], color="k", linestyle="--", label=f"ceiling N={top}")
    for direct, style in zip((c for c in result["cells"] if c["kind"] == "direct"), (":", "-."), strict=False):
        ax.axhline(direct["audio_per_s"], color="grey", linestyle=style, label=f"direct, {direct['threads']} thread(s)")
    _concurrency_axis(ax, result)
    ax.set(ylim=(0, None), ylabel="audio s per wall s", title="Throughput")
    clip_s = sum(result["clips"]) / len(result["clips"])

    def to_requests(audio: Any) -> Any:
        return audio / clip_s  # the same clips everywhere, so requests/s is audio s/s over the mean clip

    def to_audio(requests: Any) -> Any:
        return requests * clip_s

    ax.secondary_yaxis("right", functions=(to_requests, to_audio)).set_ylabel("requests/s")
    ax.legend(fontsize=7)


def _concurrency_axis(ax: Axes, result: Result) -> None:
    levels = sorted({c["concurrency"] for c in result["cells"] if c["kind"] == "pool"})
    ax.set_xscale("log")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent clients C")


def _latency(ax: Axes, result: Result) -> None:
    for name, cells in _series(result):
        xs = [c["concurrency"] for c in cells]
        line = ax.plot(xs, [c["latency_ms"]["p50"] for c in cells], marker="o", label=f"{name} p50")[0]
        ax.plot(
            xs,
            [c["latency_ms"]["p99"] for c in cells],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{name} p99",
        )
    load = result["load80"]
    ax.axhline(load["cell"]["latency_ms"]["p99"], color="red", linestyle=":", label="p99 at 80% load (open loop)")
    ax.axhline(1.1 * load["mdc_p99_ms"], color="red", linestyle="-", alpha=0.3, label="target: 1.1 × M/D/c p99")
    _concurrency_axis(ax, result)
    ax.set(yscale="log", ylabel="ms", title="Latency p50 / p99")
    ax.legend(fontsize=6)


def _memory(ax: Axes, result: Result) -> None:
    seen: dict[str, float] = {}
    for c in result["cells"]:
        if c["rss_mb"] and c["kind"] != "load80":
            seen[f"{c['kind']}\nN={c['workers']}"] = max(
                seen.get(f"{c['kind']}\nN={c['workers']}", 0), max(c["rss_mb"])
            )
    for name, s in result["startup"].items():
        seen[f"supervisor\n{name}"] = s["hub_rss_mb"]
    ax.bar(list(seen), list(seen.values()), color="tab:purple")
    ax.set(ylabel="MB", title="Peak RSS per process")
    ax.tick_params(axis="x", labelsize=6)


def _cpu(ax: Axes, result: Result) -> None:
    for name, cells in _series(result):
        ax.plot([c["concurrency"] for c in cells], [c["usage"]["machine_pct"] for c in cells], marker="o", label=name)
    _concurrency_axis(ax, result)
    ax.set(ylim=(0, 105), ylabel="% of all cores", title="CPU utilisation")
    ax.legend(fontsize=7)


def _overhead(ax: Axes, result: Result) -> None:
    o = result["overhead"]
    names = {
        "bare_1hop": "bare\nZeroMQ",
        "bare_broker": "bare\nbroker",
        "hub_inline": "hub\ninline",
        "hub_shm": "hub\nshm",
    }
    p50 = [o[k]["latency_ms"]["p50"] for k in names]
    bars = ax.bar(list(names.values()), p50, color="tab:orange")
    for bar, key in zip(bars, names, strict=False):
        ax.annotate(
            f"{o[key]['requests_per_s']:.0f}/s",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set(ylabel="p50 ms (bars); req/s (labels)", title="Echo round trip")


def _transport(ax: Axes, result: Result) -> None:
    rows = result["overhead"]["sizes"]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["shm"]["p50"] for r in rows], width=0.4, label="shared memory")
    ax.bar([x + 0.2 for x in xs], [r["inline"]["p50"] for r in rows], width=0.4, label="inline")
    ax.set_xticks(list(xs), [f"{r['audio_s']:g} s" for r in rows])
    ax.set(yscale="log", ylabel="p50 ms", title="Echo: shared memory vs inline")
    ax.legend(fontsize=7)


def draw(result: Result, path: Path) -> None:
    matplotlib.use("Agg")  # before pyplot is imported: no display is needed, nor wanted
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    panels: list[Any] = [_throughput, _latency, _cpu, _memory, _overhead, _transport]
    for panel, ax in zip(panels, axes.flat, strict=False):
        panel(ax, result)
    m = result["meta"]
    fig.suptitle(f"ASR Hub benchmark {m['timestamp']}: {m['machine']['cores']} cores, {m['device']}, tiny.en")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
