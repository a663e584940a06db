"""The side-by-side of ``make bench-peers``: hub against Ray Serve, as hub/Ray ratios from one run.

Pure functions of the result dict that ``bench.peers`` saves as JSON, so a saved run can be reported again
and the arithmetic is tested without Ray (tests/system/test_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.procstats import FOREIGN_LIMIT_PCT, disturbed

Result = dict[str, Any]
PATHS = (("client", "SDK / handle"), ("http", "HTTP"))


@dataclass(frozen=True)
class Comparison:
    """One figure measured on both sides, and which way is better."""

    figure: str
    unit: str
    hub: float
    ray: float
    higher_is_better: bool
    disturbed: bool = False  # others took over FOREIGN_LIMIT_PCT of a core during a run it rests on (the ceiling too)
    note: str = ""

    @property
    def hub_over_ray(self) -> float:
        return self.hub / self.ray if self.ray else float("inf")

    @property
    def hub_ahead(self) -> bool:
        return self.hub >= self.ray if self.higher_is_better else self.hub <= self.ray


def _either_disturbed(*runs: Result) -> bool:
    return any(disturbed(run.get("usage", {})) for run in runs)


def comparisons(result: Result) -> list[Comparison]:
    """Throughput against the fair ceiling, the no-op's p50 and requests per second (each through the
    in-process API and over HTTP), resident memory of all processes, time from start to the first answer."""
    hub, ray, roof = result["hub"], result["ray"], result["ceiling"]["audio_per_s"]
    out = []
    for path, name in PATHS:
        h, r = hub["whisper"][path], ray["whisper"][path]
        out.append(
            Comparison(
                f"whisper throughput, share of the fair ceiling ({name}, C={result['concurrency']})",
                "×",
                h["audio_per_s"] / roof,
                r["audio_per_s"] / roof,
                True,
                _either_disturbed(h, r, result["ceiling"]),
                f"{h['audio_per_s']:.1f} and {r['audio_per_s']:.1f} against {roof:.1f} audio s/s",
            )
        )
    for path, name in PATHS:
        h, r = hub["echo"][path]["latency"], ray["echo"][path]["latency"]
        out.append(
            Comparison(
                f"no-op p50, one request at a time ({name})",
                "ms",
                h["latency_ms"]["p50"],
                r["latency_ms"]["p50"],
                False,
                _either_disturbed(h, r),
            )
        )
    for in_flight in result["in_flight"]:
        for path, name in PATHS:
            h, r = hub["echo"][path]["load"][str(in_flight)], ray["echo"][path]["load"][str(in_flight)]
            out.append(
                Comparison(
                    f"no-op requests/s, {in_flight} in flight ({name})",
                    "req/s",
                    h["requests_per_s"],
                    r["requests_per_s"],
                    True,
                    _either_disturbed(h, r),
                )
            )
    out += [
        Comparison(
            "resident memory of all processes, after the whisper runs",
            "MB",
            hub["rss_mb"],
            ray["rss_mb"],
            False,
            note=f"{hub['processes']} processes against {ray['processes']}",
        ),
        Comparison("start to first answer", "s", hub["first_answer_s"], ray["first_answer_s"], False),
    ]
    return out


def _value(value: float, unit: str) -> str:
    if unit == "×":
        return f"{value:.2f}"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}"


def format_table(result: Result) -> str:
    """The comparison as a Markdown table (bench/README.md keeps the latest), with the run's conditions."""
    m = result["meta"]
    lines = [
        (
            f"hub against Ray Serve {m['ray_version']} ({m['timestamp']}, {m['machine']['cores']} cores, "
            f"{'quick' if m['quick'] else 'full'} run): tiny.en int8, {result['replicas']} model processes × 1 thread "
            f"taking one request at a time, clips of {min(result['clips']):.1f}-{max(result['clips']):.1f} s; "
            f"fair ceiling: {result['replicas']} bare processes from one shared queue"
        ),
        "",
        "| figure | hub | Ray Serve | hub/Ray | |",
        "|---|---|---|---|---|",
    ]
    for c in comparisons(result):
        mark = " *" if c.disturbed else ""
        verdict = "hub ahead" if c.hub_ahead else "Ray ahead"
        note = f" ({c.note})" if c.note else ""
        lines.append(
            f"| {c.figure}{note} | {_value(c.hub, c.unit)}{mark} | {_value(c.ray, c.unit)}{mark} | "
            f"{c.hub_over_ray:.2f} | {verdict} |"
        )
    if any(c.disturbed for c in comparisons(result)):
        lines += [
            "",
            f"* other processes used more than {FOREIGN_LIMIT_PCT:.0f}% of a core during that measurement: "
            "its figures are doubtful; rerun on a quiet machine.",
        ]
    return "\n".join(lines)
