"""Status figures, the Prometheus page, health endpoints, logs and GPU readings."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.errors import HubError, PoolBusy
from hub.supervisor.metrics import Histogram, Metrics, Window
from tests.conftest import ROOT, echo_provider, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)


def _documented_metrics() -> set[str]:
    """The family names the operations guide's metrics table lists (counters without ``_total``, as the
    parser names them)."""
    table = (ROOT / "docs" / "operations" / "pool_monitoring.md").read_text()
    names = re.findall(r"^\| `(asr_hub_\w+)` \|", table, flags=re.M)
    return {name.removesuffix("_total") for name in names}


DOCUMENTED = _documented_metrics()


def test_histogram_percentiles_from_the_sketch_and_buckets_at_its_edges() -> None:
    h = Histogram((0.1, 0.2, 0.5, 1.0))
    for v in [0.05] * 50 + [0.15] * 40 + [0.7] * 10:
        h.observe(v)
    assert h.count == 100 and h.mean == pytest.approx((50 * 0.05 + 40 * 0.15 + 10 * 0.7) / 100)
    assert h.quantile(0.4) == pytest.approx(0.05, rel=0.01)
    assert h.quantile(0.8) == pytest.approx(0.15, rel=0.01) and h.quantile(0.99) == pytest.approx(0.7, rel=0.01)
    buckets = h.cumulative()
    bounds = [float(b) for b, _ in buckets[:-1]]
    assert all(nominal <= b <= nominal * 1.02 for nominal, b in zip((0.1, 0.2, 0.5, 1.0), bounds, strict=False))
    assert [n for _, n in buckets] == [50.0, 90.0, 90.0, 100.0, 100.0] and buckets[-1][0] == "+Inf"
    assert Histogram().quantile(0.5) is None


def test_window_forgets_what_is_older_than_a_minute() -> None:
    w = Window()
    w.add(100.2, 1.0)
    w.add(100.9, 2.0)
    w.add(130.0, 4.0)
    assert w.total(130.5) == 7.0 and w.total(160.5) == 4.0 and w.total(200.0) == 0.0


def test_counters_match_a_known_sequence() -> None:
    m = Metrics()
    for _ in range(3):
        m.finished("p", 10.0, wait=0.01, run=0.5, audio=2.0, code=None)
    m.finished("p", 10.0, wait=0.01, run=0.1, audio=2.0, code="INFERENCE_FAILED")
    m.finished("p", 10.0, wait=1.0, run=0.0, audio=2.0, code="ACQUIRE_TIMEOUT")
    m.finished("p", 10.0, wait=0.0, run=5.0, audio=2.0, code="JOB_TIMEOUT")
    m.rejected("p", "POOL_BUSY")
    s = m.summary("p", 10.5, workers=2)
    assert (s.requests, s.succeeded, s.failed, s.rejected, s.timed_out) == (7, 3, 1, 1, 2)
    assert s.errors == {"INFERENCE_FAILED": 1, "ACQUIRE_TIMEOUT": 1, "JOB_TIMEOUT": 1, "POOL_BUSY": 1}
    assert s.success_rate == pytest.approx(3 / 6, abs=1e-4)
    assert s.throughput == pytest.approx(6.0 / 60) and s.utilization == pytest.approx(6.6 / 120, abs=1e-4)
    assert s.inference_ms.mean == pytest.approx(500.0)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_status_and_metrics_page_after_a_known_sequence(hub_factory) -> None:
    port = free_port()
    hub = hub_factory(
        {"echo": echo_provider(min_size=1, max_size=1, max_queue=0, job_timeout=1.5, job_timeout_per_audio_second=0.0)},
        hub={"metrics_port": port},
    )
    with hub.client() as client:
        for _ in range(3):
            client.transcribe(TONE)
        with pytest.raises(HubError, match="boom"):
            client.transcribe(TONE, fail="boom")
        with pytest.raises(HubError, match="deadline"):
            client.transcribe(TONE, hang=True)
        blocker = threading.Thread(target=client.transcribe, args=(TONE,), kwargs={"sleep": 1.2, "timeout": 20})

        def replaced() -> bool:
            return [(w["state"], w["restarts"]) for w in client.status()["providers"]["echo"]["workers"]] == [
                ("idle", 1)
            ]

        wait_for(replaced, what="the hung worker's replacement")
        blocker.start()
        wait_for(
            lambda: client.status()["providers"]["echo"]["workers"][0]["state"] == "busy", what="the blocker running"
        )
        with pytest.raises(PoolBusy):
            client.transcribe(TONE)
        blocker.join(30)
        echo = client.status()["providers"]["echo"]
    assert (echo["requests"], echo["succeeded"], echo["failed"], echo["rejected"], echo["timed_out"]) == (7, 4, 1, 1, 1)
    assert echo["errors"] == {"INFERENCE_FAILED": 1, "JOB_TIMEOUT": 1, "POOL_BUSY": 1}
    assert echo["success_rate"] == pytest.approx(4 / 6, abs=1e-3) and echo["throughput"] > 0
    assert echo["inference_ms"]["p95"] > 0 and echo["wait_ms"]["p50"] is not None and 0 < echo["utilization"] <= 1
    assert set(echo["workers_by_state"]) == {"starting", "idle", "busy", "draining", "unhealthy"}
    worker = echo["workers"][0]
    assert worker["restarts"] == 1 and worker["rss_mb"] > 0 and worker["gpu_error"] == ""  # echo has no GPU
    families = _families(port, lambda families: "asr_hub_worker_restarts" in families)  # gauges come once a second
    exported = {name for name in families if name.startswith("asr_hub_")}
    assert "asr_hub_worker_session_duty" in DOCUMENTED and len(DOCUMENTED) > 25  # the table was read
    gpu = {"asr_hub_worker_gpu_memory_used_bytes", "asr_hub_worker_gpu_utilization"}  # absent without NVML
    assert exported - gpu == DOCUMENTED - gpu, (
        "the metrics table in docs/operations/pool_monitoring.md and the page differ"
    )
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("asr_hub_succeeded_total", (("provider", "echo"),))] == 4
    assert value[("asr_hub_errors_total", (("code", "POOL_BUSY"), ("provider", "echo")))] == 1
    assert value[("asr_hub_wait_seconds_count", (("provider", "echo"),))] == 6
    assert value[("asr_hub_worker_restarts", (("provider", "echo"), ("worker", worker["id"])))] == 1
    assert _get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")


def test_session_gauges_follow_the_sessions_on_each_worker(hub_factory) -> None:
    """Three sessions on a pool of one worker that holds three: the pool's and the worker's session gauges say 3,
    its session duty is a fraction; after they close, 0."""
    port = free_port()
    hub = hub_factory(
        {"echo": echo_provider(min_size=1, max_size=1, sessions_per_worker=3)}, hub={"metrics_port": port}
    )
    with hub.client() as client:
        sessions = [client.open_stream() for _ in range(3)]
        for session in sessions:
            session.send(TONE)
        worker = client.status()["providers"]["echo"]["workers"][0]["id"]
        families = _families(port, lambda f: _sample(f, "asr_hub_pool_sessions", provider="echo") == 3)
        assert _sample(families, "asr_hub_worker_sessions", provider="echo", worker=worker) == 3
        assert 0 <= _sample(families, "asr_hub_worker_session_duty", provider="echo", worker=worker) <= 1
        for session in sessions:
            session.close()
        families = _families(port, lambda f: _sample(f, "asr_hub_worker_sessions", provider="echo", worker=worker) == 0)
        assert _sample(families, "asr_hub_pool_sessions", provider="echo") == 0


def _families(port: int, ready: Any) -> dict[str, Any]:
    """The metric families of the page, read again until ``ready(families)`` holds (gauges are published
    once a second)."""
    found: dict[str, Any] = {}

    def read() -> bool:
        code, page = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200, page
        found.clear()
        found.update({f.name: f for f in text_string_to_metric_families(page)})
        return bool(ready(found))

    wait_for(read, what="the metrics page")
    return found


def _sample(families: dict[str, Any], name: str, **labels: str) -> float:
    family = families[name]
    return next(s.value for s in family.samples if s.labels.items() >= labels.items())


def test_readyz_follows_the_only_worker(hub_factory) -> None:
    port = free_port()
    hub = hub_factory(
        {"whisper": {"model": "tiny.en", "pool": {"min_size": 1, "max_size": 1}}}, hub={"metrics_port": port}
    )
    # the page reads the gauges the supervisor publishes once a second: ready there may come that much later
    wait_for(lambda: _get(f"http://127.0.0.1:{port}/readyz")[0] == 200, timeout=5, what="/readyz ready")
    worker = hub.status()["providers"]["whisper"]["workers"][0]
    # device auto, and no driver here: nobody knows of a GPU, so the worker is not placed on one
    assert worker["gpu"] is None and worker["gpu_memory_used_mb"] is None and worker["device"] == "cpu"
    os.kill(worker["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _get(f"http://127.0.0.1:{port}/readyz")[0] != 503:
        assert time.monotonic() < deadline, "/readyz never turned unready"
        time.sleep(0.02)
    deadline = time.monotonic() + 30
    while _get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
        assert time.monotonic() < deadline, "/readyz never turned ready again"
        time.sleep(0.1)


def test_json_logs_and_the_periodic_summary(hub_factory) -> None:
    hub = hub_factory(
        {"echo": echo_provider()}, hub={"log_format": "json", "metrics_log_interval": 0.5, "log_level": "DEBUG"}
    )
    with hub.client() as client:
        client.transcribe(TONE)
        with pytest.raises(HubError, match="boom"):
            client.transcribe(TONE, fail="boom")  # the worker logs the failure itself, with its traceback
    wait_for(lambda: '"pool echo: size 1' in hub.log(), what="the periodic summary")
    entries = [json.loads(line) for line in hub.log().splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    messages = [e["msg"] for e in entries]
    assert any(m.startswith("pool echo: size 1") for m in messages)
    assert any("job j1 (request" in m for m in messages)  # each request at debug, with its job id
    # the worker's own line (not the supervisor's about it), in JSON too
    worker = [
        e for e in entries if e["logger"].startswith("workers") and "echo-1" in e["msg"] and "job j2 failed" in e["msg"]
    ]
    assert worker and "RuntimeError: boom" in worker[0]["exc"], entries


def test_cli_status_watch_redraws(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider()})
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub.client", "--endpoint", hub.endpoint, "status", "--watch"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    out, deadline = "", time.monotonic() + 30
    while (
        out.count("echo (echo, pool): size 1") < 2 and time.monotonic() < deadline and (line := proc.stdout.readline())
    ):
        out += line  # the CLI redraws every second: wait for two screens, however slow its start
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=10)
    out += rest
    assert proc.returncode == 0 and out.count("echo (echo, pool): size 1") >= 2 and "\x1b[2J" in out


def test_healthz_fails_when_the_supervisor_loop_stalls() -> None:
    from hub.supervisor import probes as http

    metrics = Metrics()
    port = free_port()
    server = http.serve(metrics, "127.0.0.1", port)
    try:
        assert _get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        metrics.loop_at -= 60  # as if the loop had not run for a minute
        code, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert code == 503 and "has not run for 60 s" in body
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 503
    finally:
        server.shutdown()


def test_supervisor_log_flags_override_the_config(hub_factory) -> None:
    """--log-format json and --log-level DEBUG win over the file's text/INFO."""
    hub = hub_factory(
        {"echo": echo_provider()},
        hub={"log_format": "text", "log_level": "INFO"},
        args=("--log-format", "json", "--log-level", "DEBUG"),
    )
    with hub.client() as client:
        client.transcribe(TONE)
    wait_for(lambda: "job j1 (request" in hub.log(), what="the request's debug line")
    entries = [json.loads(line) for line in hub.log().splitlines() if line.strip()]
    assert any(e["level"] == "DEBUG" and e["msg"].startswith("job j1 (request") for e in entries)


def test_metrics_host_sets_the_address_the_endpoint_binds(hub_factory) -> None:
    port = free_port()
    hub_factory({"echo": echo_provider()}, hub={"metrics_port": port, "metrics_host": "127.0.0.2"})
    assert _get(f"http://127.0.0.2:{port}/healthz") == (200, "ok\n")
    with pytest.raises(urllib.error.URLError):  # nothing listens on the other loopback address
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
