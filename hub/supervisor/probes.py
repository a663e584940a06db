"""The supervisor's HTTP side: ``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (ready to serve).

It runs on a daemon thread and reads only ``Metrics``, which is lock-guarded, and the
readiness flag and loop timestamp the supervisor sets on every loop pass: ``/healthz``
answers 503 when the loop has stalled, not merely while the process exists; ``/readyz``
answers 503 from the moment draining starts, so a pod leaves its Service before it stops.
Each connection gets its own thread: a client that sends half a request must not hold up
the liveness probe (a kubelet would kill a healthy hub).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from hub.supervisor.metrics import Metrics, PrometheusCollector

STALL_SECONDS = 5.0  # the loop passes every 50 ms; this long without one means it is stuck


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds are not news
        pass


def serve(metrics: Metrics, host: str, port: int) -> WSGIServer:
    """Start the server on a daemon thread; ``shutdown()`` stops it."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PrometheusCollector(metrics))
    prometheus = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            stalled = time.monotonic() - metrics.loop_at
            if stalled < STALL_SECONDS:
                return _text(start_response, "200 OK", "ok\n")
            return _text(start_response, "503 Service Unavailable", f"the supervisor's loop has not run for {stalled:.0f} s\n")
        if path == "/readyz":
            if metrics.ready:
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable", "not ready: draining, or a provider has fewer than min_size ready workers\n")
        if path == "/metrics":
            return prometheus(environ, start_response)
        return _text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")

    server = make_server(host, port, app, server_class=ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def _text(start_response: Callable[..., Any], status: str, body: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [body.encode()]
