"""Counters, histograms and sliding windows per provider; the status figures and the Prometheus page.

Recording is O(1) on the dispatch path: a counter bump, a sketch update, a slot of a
one-minute ring. Percentiles are read from a relative-error sketch (``hub.sketch``, within
1 %), never by sorting samples. The Prometheus collector runs on the HTTP server's thread, so everything
it reads is guarded by one lock, and the gauges it exports are a snapshot that the
supervisor publishes once a second rather than its live structures.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from hub.status import Percentiles, RequestFigures, RouteFigures, RouteShare, Spread
from hub.supervisor.sketch import QuantileSketch

# seconds; the Prometheus buckets, wide enough for a 5 ms echo and a 5-minute clip on a CPU
BUCKETS = tuple(round(m * 10.0**e, 4) for e in range(-3, 3) for m in (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)) + (1000.0,)
WINDOW = 60  # seconds over which utilisation and throughput are averaged

# word error rate of a shadow against the primary: 0 is agreement, 1 is nothing in common
WER_BUCKETS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
# a shadow's time on its worker over the primary's
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
SHADOW_OUTCOMES = ("compared", "dropped", "failed")
# jobs a worker decoded together in one forward pass (pool.max_batch is at most 256)
BATCH_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0, 256.0)
# pieces a long request was cut into
PIECE_BUCKETS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0)

REJECTED = frozenset({"POOL_BUSY", "PROVIDER_UNAVAILABLE", "SHUTTING_DOWN", "UNKNOWN_PROVIDER", "BAD_REQUEST"})
TIMED_OUT = frozenset({"ACQUIRE_TIMEOUT", "JOB_TIMEOUT"})


class Histogram(QuantileSketch):
    """Durations in a relative-error sketch: percentiles within 1 %, Prometheus buckets read from it.

    Recording (``observe``) is one sketch update. The Prometheus buckets are not counted apart: each
    ``le`` bound is the sketch's bin edge nearest above the nominal bound (at most 2 % above it),
    so the cumulative counts read at scrape time are exact for the bound they are labelled with.
    """

    __slots__ = ("edges",)

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        super().__init__()
        self.edges = tuple(self.index(b) for b in bounds)

    observe = QuantileSketch.add

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, cumulative count), ending with +Inf."""
        counts = self.counts_through(self.edges)
        bounds = [repr(self.upper(i)) for i in self.edges]
        return [(bound, float(n)) for bound, n in zip(bounds, counts, strict=False)] + [("+Inf", float(self.count))]

    def summary(self) -> Percentiles:
        """Mean and percentiles in milliseconds, for status."""

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 3)

        return Percentiles(
            mean=ms(self.mean), p50=ms(self.quantile(0.5)), p95=ms(self.quantile(0.95)), p99=ms(self.quantile(0.99))
        )


class Window:
    """A sum over the last ``WINDOW`` seconds in one-second slots: O(1) to add and O(WINDOW) to read."""

    def __init__(self) -> None:
        self.slots = [0.0] * WINDOW
        self.stamps = [-1] * WINDOW

    def add(self, now: float, value: float) -> None:
        second = int(now)
        i = second % WINDOW
        if self.stamps[i] != second:
            self.stamps[i], self.slots[i] = second, 0.0
        self.slots[i] += value

    def total(self, now: float) -> float:
        second = int(now)
        return sum(v for v, s in zip(self.slots, self.stamps, strict=False) if second - WINDOW < s <= second)


@dataclass
class ProviderMetrics:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    session_resumes: int = 0  # live sessions moved to another worker after theirs died
    pieces: int = 0  # pieces long requests were cut into
    pieces_per_request: Histogram = field(default_factory=lambda: Histogram(PIECE_BUCKETS))
    errors: Counter[str] = field(default_factory=Counter)
    audio_seconds: float = 0.0
    wait: Histogram = field(default_factory=Histogram)
    inference: Histogram = field(default_factory=Histogram)
    busy: Window = field(default_factory=Window)  # worker-seconds spent on jobs
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))  # jobs per forward pass
    batches: Window = field(default_factory=Window)  # forward passes ...
    batched_jobs: Window = field(default_factory=Window)  # ... and the jobs in them, for the window's mean batch
    audio: Window = field(default_factory=Window)  # audio seconds transcribed

    def summary(self, now: float, workers: int) -> RequestFigures:
        finished = self.succeeded + self.failed + self.timed_out
        span = float(WINDOW)
        return RequestFigures(
            requests=self.requests,
            succeeded=self.succeeded,
            failed=self.failed,
            rejected=self.rejected,
            timed_out=self.timed_out,
            session_resumes=self.session_resumes,
            pieces=self.pieces,
            errors=dict(self.errors),
            success_rate=round(self.succeeded / finished, 4) if finished else None,
            wait_ms=self.wait.summary(),
            inference_ms=self.inference.summary(),
            utilization=round(min(1.0, self.busy.total(now) / (span * workers)), 4) if workers else 0.0,
            throughput=round(self.audio.total(now) / span, 4),
            mean_batch=round(self.batched_jobs.total(now) / passes, 3) if (passes := self.batches.total(now)) else None,
        )


@dataclass
class RouteMetrics:
    """One route's figures: requests and errors per provider it sent them to, its shadow's comparisons."""

    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    shadow: Counter[tuple[str, str]] = field(default_factory=Counter)  # (provider, outcome)
    agreement: dict[str, Histogram] = field(default_factory=dict)  # shadow provider -> WER
    latency_ratio: dict[str, Histogram] = field(default_factory=dict)  # shadow provider -> its time / primary's
    rollbacks: Counter[str] = field(default_factory=Counter)
    weights: dict[str, float] = field(default_factory=dict)

    def summary(self) -> RouteFigures:
        names = [*self.weights, *(p for p in self.requests if p not in self.weights)]
        return RouteFigures(
            providers={
                p: RouteShare(weight=self.weights.get(p, 0.0), requests=self.requests[p], errors=self.errors[p])
                for p in names
            },
            shadow_requests={f"{p} {outcome}": n for (p, outcome), n in self.shadow.items()},
            agreement_wer={p: _spread(h) for p, h in self.agreement.items()},
            latency_ratio={p: _spread(h) for p, h in self.latency_ratio.items()},
            rollbacks=dict(self.rollbacks),
        )


def _spread(h: Histogram) -> Spread:
    """A histogram of plain numbers (WER, ratios) for status: count, mean and percentiles."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4)

    return Spread(count=h.count, mean=r(h.mean), p50=r(h.quantile(0.5)), p95=r(h.quantile(0.95)))


class Metrics:
    """Every provider's figures, plus the gauge snapshot the Prometheus page exports."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.providers: dict[str, ProviderMetrics] = {}
        self.routes: dict[str, RouteMetrics] = {}
        self.gauges: dict[str, Any] = {"providers": {}, "ready": False}
        self.ready = False  # set by the supervisor on every loop pass; read by /readyz
        self.loop_at = time.monotonic()  # when the supervisor's loop last ran; /healthz fails when it stalls

    def _of(self, provider: str) -> ProviderMetrics:
        metrics = self.providers.get(provider)
        if metrics is None:
            metrics = self.providers[provider] = ProviderMetrics()
        return metrics

    def rejected(self, provider: str, code: str) -> None:
        """A request refused before it was queued."""
        with self.lock:
            m = self._of(provider)
            m.requests += 1
            m.rejected += 1
            m.errors[code] += 1

    def batch(self, provider: str, size: int, now: float) -> None:
        """A worker started decoding ``size`` jobs together in one forward pass."""
        with self.lock:
            m = self._of(provider)
            m.batch_size.observe(float(size))
            m.batches.add(now, 1.0)
            m.batched_jobs.add(now, float(size))

    def resumed(self, provider: str) -> None:
        """A live session whose worker died moves to another worker."""
        with self.lock:
            self._of(provider).session_resumes += 1

    def split(self, provider: str, pieces: int) -> None:
        """A long request was cut into ``pieces`` (counted once its plan is complete)."""
        with self.lock:
            m = self._of(provider)
            m.pieces += pieces
            m.pieces_per_request.observe(pieces)

    def finished(self, provider: str, now: float, wait: float, run: float, audio: float, code: str | None) -> None:
        """A request answered after it was accepted: ``code`` None for success, else the error's code."""
        with self.lock:
            m = self._of(provider)
            m.requests += 1
            m.wait.observe(wait)
            if run > 0:
                m.busy.add(now, run)
            if code is None:
                m.succeeded += 1
                m.inference.observe(run)
                m.audio_seconds += audio
                m.audio.add(now, audio)
                return
            m.errors[code] += 1
            if code in TIMED_OUT:
                m.timed_out += 1
            elif code in REJECTED:
                m.rejected += 1
            else:
                m.failed += 1

    def summary(self, provider: str, now: float, workers: int) -> RequestFigures:
        with self.lock:
            return self._of(provider).summary(now, workers)

    def _route(self, route: str) -> RouteMetrics:
        metrics = self.routes.get(route)
        if metrics is None:
            metrics = self.routes[route] = RouteMetrics()
        return metrics

    def route_finished(self, route: str, provider: str, error: bool) -> None:
        """A request that went through ``route`` to ``provider`` was answered (or failed)."""
        with self.lock:
            m = self._route(route)
            m.requests[provider] += 1
            if error:
                m.errors[provider] += 1

    def route_shadow(self, route: str, provider: str, outcome: str) -> None:
        """A shadow request: ``compared``, ``dropped`` (no idle worker) or ``failed``."""
        with self.lock:
            self._route(route).shadow[(provider, outcome)] += 1

    def route_compared(self, route: str, provider: str, wer: float, ratio: float | None) -> None:
        """A shadow's answer beside the primary's: their WER and the shadow's time over the primary's."""
        with self.lock:
            m = self._route(route)
            m.shadow[(provider, "compared")] += 1
            m.agreement.setdefault(provider, Histogram(WER_BUCKETS)).observe(wer)
            if ratio is not None:
                m.latency_ratio.setdefault(provider, Histogram(RATIO_BUCKETS)).observe(ratio)

    def route_rolled_back(self, route: str, provider: str) -> None:
        with self.lock:
            self._route(route).rollbacks[provider] += 1

    def route_weights(self, route: str, weights: dict[str, float]) -> None:
        with self.lock:
            self._route(route).weights = dict(weights)

    def route_summary(self, route: str) -> RouteFigures:
        with self.lock:
            return self._route(route).summary()

    def publish(self, gauges: dict[str, Any]) -> None:
        """The supervisor's once-a-second snapshot of pool sizes, states and worker readings."""
        with self.lock:
            self.gauges = gauges


class PrometheusCollector(Collector):
    """Builds the ``asr_hub_*`` families at scrape time from ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        with self.metrics.lock:
            providers = {name: _copy(m) for name, m in self.metrics.providers.items()}
            routes = {name: _copy_route(m) for name, m in self.metrics.routes.items()}
            gauges = self.metrics.gauges
        yield from _request_families(providers)
        yield from _gauge_families(gauges)
        yield from _route_families(routes)


def _copy_route(m: RouteMetrics) -> dict[str, Any]:
    return {
        "requests": dict(m.requests),
        "errors": dict(m.errors),
        "shadow": dict(m.shadow),
        "rollbacks": dict(m.rollbacks),
        "weights": dict(m.weights),
        "agreement": {p: (h.cumulative(), h.sum) for p, h in m.agreement.items()},
        "latency_ratio": {p: (h.cumulative(), h.sum) for p, h in m.latency_ratio.items()},
    }


def _route_families(routes: dict[str, dict[str, Any]]) -> Iterator[Any]:
    counters = {
        "requests": "Requests a route sent to each of its providers",
        "errors": "Requests through a route that failed, by the provider that had them",
        "rollbacks": "Canaries the analysis rolled back (weight set to 0)",
    }
    for key, doc in counters.items():
        family = CounterMetricFamily(f"asr_hub_route_{key}", doc, labels=["route", "provider"])
        for route, m in routes.items():
            for provider, n in m[key].items():
                family.add_metric([route, provider], n)
        yield family
    shadow = CounterMetricFamily(
        "asr_hub_route_shadow",
        "Shadow requests: compared, dropped (no idle worker) or failed",
        labels=["route", "provider", "outcome"],
    )
    for route, m in routes.items():
        for (provider, outcome), n in m["shadow"].items():
            shadow.add_metric([route, provider, outcome], n)
    yield shadow
    weight = GaugeMetricFamily(
        "asr_hub_route_weight", "A provider's current weight in a route", labels=["route", "provider"]
    )
    for route, m in routes.items():
        for provider, w in m["weights"].items():
            weight.add_metric([route, provider], w)
    yield weight
    histograms = {
        "agreement_wer": ("agreement", "Word error rate of a shadow's answer against the primary's"),
        "latency_ratio": ("latency_ratio", "A shadow's time on its worker over the primary's, per request"),
    }
    for name, (key, doc) in histograms.items():
        histogram = HistogramMetricFamily(f"asr_hub_route_{name}", doc, labels=["route", "provider"])
        for route, m in routes.items():
            for provider, (buckets, total) in m[key].items():
                histogram.add_metric([route, provider], buckets, total)
        yield histogram


def _copy(m: ProviderMetrics) -> dict[str, Any]:
    return {
        "requests": m.requests,
        "succeeded": m.succeeded,
        "failed": m.failed,
        "rejected": m.rejected,
        "timed_out": m.timed_out,
        "errors": dict(m.errors),
        "audio_seconds": m.audio_seconds,
        "session_resumes": m.session_resumes,
        "pieces": m.pieces,
        "wait": (m.wait.cumulative(), m.wait.sum),
        "inference": (m.inference.cumulative(), m.inference.sum),
        "batch_size": (m.batch_size.cumulative(), m.batch_size.sum),
        "pieces_per_request": (m.pieces_per_request.cumulative(), m.pieces_per_request.sum),
    }


def _request_families(providers: dict[str, dict[str, Any]]) -> Iterator[Any]:
    counters = {
        "requests": "Requests received",
        "succeeded": "Requests answered with a transcript",
        "failed": "Accepted requests that failed",
        "rejected": "Requests refused before queueing (busy, unavailable, shutting down, bad request)",
        "timed_out": "Requests that timed out waiting for a worker or running",
        "audio_seconds": "Seconds of audio transcribed",
        "session_resumes": "Live sessions moved to another worker after theirs died",
        "pieces": "Pieces long requests were cut into (pool.split_over_seconds)",
    }
    for key, doc in counters.items():
        family = CounterMetricFamily(f"asr_hub_{key}", doc, labels=["provider"])
        for name, m in providers.items():
            family.add_metric([name], m[key])
        yield family
    errors = CounterMetricFamily("asr_hub_errors", "Errors answered, by code", labels=["provider", "code"])
    for name, m in providers.items():
        for code, n in m["errors"].items():
            errors.add_metric([name, code], n)
    yield errors
    histograms = {
        "wait_seconds": ("wait", "Seconds a job waited for a worker"),
        "inference_seconds": ("inference", "Seconds a worker ran a job"),
        "pieces_per_request": ("pieces_per_request", "Pieces each split request was cut into"),
        "batch_size": ("batch_size", "Jobs a worker decoded together in one forward pass"),
    }
    for family_name, (key, doc) in histograms.items():
        histogram = HistogramMetricFamily(f"asr_hub_{family_name}", doc, labels=["provider"])
        for name, m in providers.items():
            buckets, total = m[key]
            histogram.add_metric([name], buckets, total)
        yield histogram


def _gauge_families(gauges: dict[str, Any]) -> Iterator[Any]:
    ready = GaugeMetricFamily("asr_hub_ready", "1 when every enabled provider has its min_size workers ready")
    ready.add_metric([], 1.0 if gauges.get("ready") else 0.0)
    yield ready
    simple = {
        "size": "Live workers (starting, idle or busy)",
        "min_size": "Configured min_size",
        "max_size": "Configured max_size",
        "queue_depth": "Jobs waiting for a worker",
        "utilization": "Fraction of worker time spent busy over the last minute",
        "throughput": "Audio seconds transcribed per second over the last minute",
        "degraded": "1 while the provider's model fails to load",
        "max_queue": "Configured max_queue",
        "sessions": "Live sessions, open or waiting for a worker",
        "pieces_in_flight": "Pieces of split requests on workers now",
        "held_back": "1 while the pool wants to grow but max_size, memory or GPU memory holds it back",
    }
    providers = gauges.get("providers", {})
    for key, doc in simple.items():
        family = GaugeMetricFamily(f"asr_hub_pool_{key}", doc, labels=["provider"])
        for name, p in providers.items():
            family.add_metric([name], float(p[key]))
        yield family
    states = GaugeMetricFamily("asr_hub_workers", "Workers by state", labels=["provider", "state"])
    for name, p in providers.items():
        for state, n in p["states"].items():
            states.add_metric([name, state], float(n))
    yield states
    per_worker = {
        "rss_bytes": "Resident memory of a worker process",
        "jobs_done": "Jobs a worker has finished",
        "sessions": "Live sessions a worker serves (its session load)",
        "session_duty": (
            "Fraction of the last heartbeat interval a worker spent decoding its sessions "
            "(one-shot jobs go to it only below 0.5)"
        ),
        "restarts": "Restarts of a worker's slot",
        "gpu_memory_used_bytes": (
            "GPU memory of the worker process itself, by pid (absent without NVML or where the driver cannot see the pid)"
        ),
        "gpu_utilization": "Utilisation of the card a worker runs on, percent (absent without NVML)",
    }
    for key, doc in per_worker.items():
        family = GaugeMetricFamily(f"asr_hub_worker_{key}", doc, labels=["provider", "worker"])
        for name, p in providers.items():
            for w in p["workers"]:
                if w.get(key) is not None:
                    family.add_metric([name, w["id"]], float(w[key]))
        yield family
