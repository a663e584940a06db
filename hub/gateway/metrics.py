"""The gateway's own Prometheus figures, in a registry of its own (served on the gateway's /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asr_hub_gateway_requests",
            "HTTP requests answered by the gateway, by route and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "asr_hub_gateway_request_seconds",
            "Time from a request's arrival to its answer (for streams: to the last byte), by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.websockets = Gauge(
            "asr_hub_gateway_websockets_open", "Live-session WebSockets open now", registry=self.registry
        )
        self.wyoming = Gauge(
            "asr_hub_gateway_wyoming_connections_open", "Wyoming connections open now", registry=self.registry
        )
        self.in_flight = Gauge(
            "asr_hub_gateway_requests_in_flight",
            "Transcription requests the gateway is serving now (bounded by gateway.max_concurrent_requests)",
            registry=self.registry,
        )
        self.hub_up = Gauge(
            "asr_hub_gateway_hub_ready",
            "1 while a hub answers and is ready (with many hubs: at least one), 0 otherwise",
            registry=self.registry,
        )
        self.buffered = Gauge(
            "asr_hub_gateway_buffered_bytes",
            "Memory reserved for uploads in flight and their decoded audio (bounded by gateway.max_buffered_mb)",
            registry=self.registry,
        )
        self.hubs_ready = Gauge(
            "asr_hub_gateway_hubs_ready", "How many of the gateway's hubs answer and are ready", registry=self.registry
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)
