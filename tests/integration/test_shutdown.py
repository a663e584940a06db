"""Stopping the supervisor: SIGINT drains like SIGTERM, a second signal stops at once, the runtime files go,
and files left by a supervisor that was killed are replaced by the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from hub.errors import HubError, ShuttingDown
from tests.conftest import ROOT, Hub, echo_provider, live_in_group, wait_for
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(120)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)


def runtime_files(hub: Hub, hub_id: str) -> tuple[Path, Path]:
    """The pid file and the backend socket of ``hub`` (its config sets hub.runtime_dir)."""
    run = hub.config_path.parent / "run"
    return run / f"{hub_id}.pid", run / f"{hub_id}.backend.sock"


def in_flight(hub: Hub, sleep: float) -> tuple[threading.Thread, list[str]]:
    """One echo request running on the hub; its text or error code comes back in the list."""
    outcome: list[str] = []

    def run() -> None:
        with hub.client() as client:
            try:
                outcome.append(client.transcribe(TONE, sleep=sleep, timeout=120).text)
            except HubError as exc:
                outcome.append(exc.code)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(
        lambda: [w["state"] for w in hub.status()["providers"]["echo"]["workers"]] == ["busy"], what="the job running"
    )
    return thread, outcome


def test_sigint_drains_like_sigterm_and_removes_the_runtime_files(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1)})
    pid_file, socket = runtime_files(hub, hub.status()["hub"]["id"])
    assert pid_file.read_text().strip() == str(hub.proc.pid) and socket.exists()
    thread, outcome = in_flight(hub, sleep=1.5)
    hub.proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT: shutting down" in hub.log(), what="the drain")
    with hub.client() as client, pytest.raises(ShuttingDown):
        client.transcribe(TONE, timeout=10)
    thread.join(30)
    assert hub.proc.wait(30) == 0 and outcome == [echo_text(TONE)]
    assert not pid_file.exists() and not socket.exists()


def test_a_second_sigterm_stops_at_once_without_waiting_for_the_job(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1)}, hub={"drain_timeout": 300})
    thread, outcome = in_flight(hub, sleep=60)
    hub.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM: shutting down" in hub.log(), what="the drain")
    hub.proc.send_signal(signal.SIGTERM)
    # long before the job's 60 s or the 300 s drain_timeout would have ended
    assert hub.proc.wait(30) == 0
    thread.join(10)
    assert outcome == ["SHUTTING_DOWN"] and "SIGTERM again: stopping now" in hub.log()


def test_a_stale_pid_file_and_socket_are_replaced_on_the_next_start(hub_factory) -> None:
    first = hub_factory({"echo": echo_provider(min_size=1, max_size=1)})
    pid_file, socket = runtime_files(first, first.status()["hub"]["id"])
    first.expected_exit = -signal.SIGKILL
    os.killpg(first.proc.pid, signal.SIGKILL)  # no chance to clean up: both files stay behind
    first.proc.wait(10)
    assert pid_file.read_text().strip() == str(first.proc.pid) and socket.exists()
    log_path = first.log_path.with_suffix(".second.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.supervisor", "--config", str(first.config_path)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    second = Hub(first.endpoint, proc, first.config_path, log_path)
    try:
        with second.client() as client:
            client.wait_ready(60)
            assert client.transcribe(TONE).text == echo_text(TONE)
        assert pid_file.read_text().strip() == str(proc.pid) and socket.exists()
    finally:
        assert second.stop() == 0
        leftover = live_in_group(proc.pid)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert not leftover and not pid_file.exists() and not socket.exists()


def test_a_shutdown_closes_live_sessions_and_their_clients_get_every_final_and_the_reason(hub_factory) -> None:
    """A session whose client went quiet would hold the drain until its idle timeout (300 s here): stopping, the
    hub closes every session, its worker answers with what it heard, and the hub is gone within seconds."""
    hub = hub_factory(
        {"echo": echo_provider(min_size=1, max_size=1, session_idle_timeout=300)}, hub={"drain_timeout": 300}
    )
    with hub.client() as client:
        session = client.open_stream("echo")
        session.send(np.full(16000, 0.02, dtype=np.float32))  # one second: two echo "words" of RMS 20
        assert next(iter(session.results())).text == "a20 a20"  # its first step: the worker has the audio
        hub.proc.send_signal(signal.SIGTERM)
        assert hub.proc.wait(30) == 0
        transcript = session.close()
    assert transcript.text == "a20 a20" and transcript.extra["closed_reason"] == "the hub is shutting down"
