"""What a long run's samples say about a day: the least-squares slope of a series and its projection to 24 hours,
with the soak's verdicts (pure; tested in tests/unit/test_trend.py).

A soak of half an hour cannot show a day, but a leak shows as a slope: RSS, open descriptors or shared-memory
segments that grow at a steady rate. The first minutes are left out of the fit (``settle_s``): caches, the
allocator's arenas and the first workers' model pages fill then, and that growth stops.

The line goes through each window's floor (``floors``), not through every reading: work in flight only adds to
a reading (a connection being opened, a worker being replaced, an upload's buffer, a request's segment), by a
few descriptors or MiB at random moments, and a line through those readings swings either way by more than
the bounds (two 45-minute soaks with descriptors back at their baseline fitted -17 and +99 a day). What a
leak keeps raises the floor as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DAY_S = 24 * 3600.0
MAX_RSS_GROWTH = 0.05  # projected RSS growth over a day, as a fraction of the fitted level at the start
FLOOR_WINDOW_S = 300.0  # a series is fitted through its lowest reading in each window this long


@dataclass(frozen=True)
class Trend:
    """A series fitted with a line: its level at the first sample kept, its slope per hour, how many samples."""

    start: float
    per_hour: float
    samples: int

    def projected(self, hours: float = 24.0) -> float:
        """The growth the slope gives over ``hours``."""
        return self.per_hour * hours

    def growth_fraction(self, hours: float = 24.0) -> float:
        return self.projected(hours) / self.start if self.start > 0 else 0.0


def fit(points: Sequence[tuple[float, float]], settle_s: float = 0.0) -> Trend | None:
    """The least-squares line through (seconds, value) after the first ``settle_s`` seconds; None with fewer than
    three points left (no slope to speak of)."""
    kept = settled(points, settle_s)
    if len(kept) < 3:
        return None
    n = len(kept)
    mean_t = sum(t for t, _ in kept) / n
    mean_v = sum(v for _, v in kept) / n
    spread = sum((t - mean_t) ** 2 for t, _ in kept)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in kept) / spread if spread > 0 else 0.0
    level = mean_v + slope * (kept[0][0] - mean_t)
    return Trend(start=level, per_hour=slope * 3600.0, samples=n)


def floors(points: Sequence[tuple[float, float]], window_s: float = FLOOR_WINDOW_S) -> list[tuple[float, float]]:
    """Each window's lowest reading, with its time: the series' span is cut into equal windows of about
    ``window_s``, at least three (so that a short run still has a slope)."""
    if not points:
        return []
    first, span = points[0][0], points[-1][0] - points[0][0]
    count = max(3, round(span / window_s))
    width = span / count if span > 0 else 1.0
    lowest: dict[int, tuple[float, float]] = {}
    for t, v in points:
        index = min(int((t - first) // width), count - 1)
        if index not in lowest or v < lowest[index][1]:
            lowest[index] = (t, v)
    return [lowest[index] for index in sorted(lowest)]


def fit_floors(
    points: Sequence[tuple[float, float]], settle_s: float, window_s: float = FLOOR_WINDOW_S
) -> Trend | None:
    """``fit`` through the floors of the readings after the first ``settle_s`` seconds."""
    return fit(floors(settled(points, settle_s), window_s))


def settled(points: Sequence[tuple[float, float]], settle_s: float) -> list[tuple[float, float]]:
    """The readings taken ``settle_s`` seconds or more after the first."""
    first = points[0][0] if points else 0.0
    return [(t, v) for t, v in points if t - first >= settle_s]


@dataclass(frozen=True)
class Verdict:
    what: str
    figure: str
    ok: bool


def day_verdicts(name: str, rss: Trend | None, fds: Trend | None, segments: Trend | None) -> list[Verdict]:
    """A process's projection to a day: RSS growth within ``MAX_RSS_GROWTH``, no descriptor and no segment more
    (a projected growth under one counts as none). A series without enough samples is no verdict."""
    out = []
    if rss is not None:
        growth = rss.growth_fraction()
        out.append(
            Verdict(
                f"{name} RSS in 24 h",
                f"{rss.start:.1f} MiB {rss.per_hour:+.2f} MiB/h, {growth:+.1%}",
                growth <= MAX_RSS_GROWTH,
            )
        )
    if fds is not None:
        out.append(Verdict(f"{name} open fds in 24 h", f"{fds.projected():+.1f}", fds.projected() < 1.0))
    if segments is not None:
        out.append(Verdict(f"{name} shm segments in 24 h", f"{segments.projected():+.1f}", segments.projected() < 1.0))
    return out
