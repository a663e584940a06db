"""The probes a cluster trusts: ``/healthz`` beside a half-sent request, ``/readyz`` off from the start of a drain."""

from __future__ import annotations

import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import numpy as np
import pytest

from tests.conftest import Hub, echo_provider, free_port, wait_for
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(90)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_answers_while_a_client_holds_a_request_half_sent(hub_factory: Callable[..., Hub]) -> None:
    port = free_port()
    hub_factory({"echo": echo_provider()}, hub={"metrics_port": port})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the request never ends
        time.sleep(0.2)
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        assert get(f"http://127.0.0.1:{port}/readyz") == (200, "ready\n")
        stalled.settimeout(0.2)
        with pytest.raises(TimeoutError):  # the half-sent request is still open, unanswered
            stalled.recv(1)


def test_readyz_turns_503_as_soon_as_the_drain_starts(hub_factory: Callable[..., Hub]) -> None:
    port = free_port()
    hub = hub_factory({"echo": echo_provider()}, hub={"metrics_port": port, "drain_timeout": 20})
    # /readyz reads gauges the timer publishes (up to a second after the hub says ready)
    wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 5, "/readyz 200 on a ready hub")
    answers: list[str] = []
    with hub.client() as client:
        job = threading.Thread(target=lambda: answers.append(client.transcribe(TONE, sleep=3, timeout=20).text))
        job.start()
        wait_for(lambda: hub.status()["providers"]["echo"]["workers_by_state"].get("busy"), 20, "the job running")
        hub.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.0
        while get(f"http://127.0.0.1:{port}/readyz")[0] != 503:
            assert time.monotonic() < deadline, "/readyz still 200 a second into the drain"
            time.sleep(0.05)
        assert hub.proc.poll() is None, "the hub stopped before its job finished"
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")  # draining is alive: no liveness kill
        job.join(20)
    assert answers == [echo_text(TONE)]
    assert hub.proc.wait(20) == 0


def test_the_probe_server_at_its_cap_displaces_the_oldest_half_open_connection() -> None:
    """50 half-open connections against a cap of 10 and a long deadline: a probe still gets in (each new
    connection displaces the one waiting longest, which is told 408), and no more than 10 stay open."""
    from hub.connections import ConnectionLimits
    from hub.supervisor import probes
    from hub.supervisor.metrics import Metrics

    port = free_port()
    server = probes.serve(Metrics(), "127.0.0.1", port, ConnectionLimits(header_timeout=60, max_connections=10))
    stalled = []
    try:
        threads = threading.active_count()
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            stalled.append(sock)
        wait_for(lambda: server.guard.open_count == 10 and server.guard.waiting_count == 10, 10, "the newest 10 held")
        assert threading.active_count() == threads  # no thread per connection
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.read() == b"ok\n"
        assert stalled[0].recv(64).startswith(b"HTTP/1.1 408 ")  # the oldest was displaced, and told why
    finally:
        for sock in stalled:
            sock.close()
        server.shutdown()
