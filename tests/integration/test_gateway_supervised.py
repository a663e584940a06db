"""The gateway as the supervisor's child, and standalone: restarts, drain, shutdown order, exposure, logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import openai
import psutil
import pytest
import yaml

from hub.client import HubClient
from tests.conftest import DATA, ROOT, free_port
from tests.gateway_support import Gateway, gateway_keys, wait_ready

pytestmark = pytest.mark.timeout(120)
ECHO = {"echo": {"type": "echo", "pool": {"min_size": 1, "max_size": 1}}}


def until(condition: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
    return value


def test_a_dead_gateway_is_restarted(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(ECHO)
    first = gw.hub.status()["gateway"]
    os.kill(first["pid"], signal.SIGKILL)
    again = until(lambda: (s := gw.hub.status()["gateway"])["running"] and s["pid"] != first["pid"] and s)
    assert again["restarts"] == 1 and "SIGKILL" in again["last_exit"], again
    wait_ready(gw.url)
    assert gw.get("/healthz")[0] == 200


def test_drain_keeps_answering_then_stops_the_gateway_last(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(ECHO)
    gateway_pid = gw.hub.status()["gateway"]["pid"]
    answers: list[Any] = []

    def slow() -> None:
        with HubClient(gw.hub.endpoint, timeout=30) as client:
            answers.append(client.transcribe(np.full(1600, 0.1, np.float32), "echo", sleep=3.0))

    worker = threading.Thread(target=slow)
    worker.start()
    until(lambda: gw.hub.status()["providers"]["echo"]["workers_by_state"].get("busy"))
    http = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=30)
    queued: list[Any] = []
    request = threading.Thread(
        target=lambda: queued.append(
            http.audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb"))
        )
    )
    request.start()
    until(lambda: gw.hub.status()["providers"]["echo"]["queue_depth"] == 1)
    gw.hub.proc.send_signal(signal.SIGTERM)
    until(lambda: gw.get("/readyz")[0] == 503, timeout=10)
    assert "draining" in gw.get("/readyz")[1]
    with pytest.raises(openai.InternalServerError) as refused:  # new work during the drain: 503 SHUTTING_DOWN
        http.audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb"))
    assert refused.value.status_code == 503 and refused.value.body["code"] == "shutting_down"  # type: ignore[index]
    for thread in (worker, request):
        thread.join(30)
        assert not thread.is_alive()
    assert answers and queued and queued[0].text.startswith("echo"), (answers, queued)
    assert gw.hub.proc.wait(30) == 0
    assert not psutil.pid_exists(gateway_pid) or psutil.Process(gateway_pid).status() == psutil.STATUS_ZOMBIE
    log = gw.hub.log()  # the gateway carried the queued request through the drain, and was stopped after it
    assert (
        log.index("SIGTERM: shutting down")
        < log.index("hub.supervisor: gateway stopped (exit status 0")
        < log.index("supervisor stopped")
    )


def test_gateway_stops_when_its_supervisor_is_killed(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory(ECHO)
    gateway_pid = gw.hub.status()["gateway"]["pid"]
    gw.hub.expected_exit = -signal.SIGKILL
    os.killpg(gw.hub.proc.pid, signal.SIGKILL)
    gw.hub.proc.wait(10)
    until(lambda: not psutil.pid_exists(gateway_pid), timeout=10)


def test_exposed_gateway_needs_keys(tmp_path: Path) -> None:
    config = {
        "hub": {"frontend": f"tcp://127.0.0.1:{free_port()}", "runtime_dir": str(tmp_path)},
        "providers": ECHO,
        "gateway": {"enabled": True, "host": "0.0.0.0", "port": free_port()},
    }
    path = tmp_path / "exposed.yaml"
    path.write_text(yaml.safe_dump(config))
    run = subprocess.run(
        [sys.executable, "-m", "hub.supervisor", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "gateway.host" in run.stderr and "api_keys_file" in run.stderr, run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "hub.gateway", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "allow_insecure" in run.stderr, run.stderr


def test_standalone_gateway_with_json_logs(hub_factory: Any, tmp_path: Path) -> None:
    hub = hub_factory(ECHO)
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.gateway", "--hub", hub.endpoint, "--port", str(port), "--log-format", "json"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        http = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        assert http.audio.transcriptions.create(
            model="whisper-1", file=(DATA / "hello.wav").open("rb")
        ).text.startswith("echo")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert any(line["logger"] == "hub.gateway" and "gateway on http" in line["msg"] for line in lines), lines
    assert any("gateway stopped" in line["msg"] for line in lines), lines


def test_gateway_reaches_a_curve_protected_hub_with_its_own_keys(gateway_factory: Any, tmp_path: Path) -> None:
    curve, secret, public = gateway_keys(tmp_path)
    gw: Gateway = gateway_factory(ECHO, hub=curve, client_secret_key=secret, server_public_key=public)
    http = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=30)
    assert http.audio.transcriptions.create(model="echo", file=(DATA / "hello.wav").open("rb")).text.startswith("echo")


def test_a_reload_that_moves_the_gateway_restarts_it_there(gateway_factory: Any) -> None:
    """The gateway reads its section when it starts: a SIGHUP whose config gives it another port restarts it
    (after its drain) on the new port, and says so in the log; the plain-text status shows where it is."""
    gw: Gateway = gateway_factory(ECHO)
    before = gw.hub.status()["gateway"]
    table = subprocess.run(
        [sys.executable, "-m", "hub.client", "--endpoint", gw.hub.endpoint, "status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0, table.stderr
    assert (
        f"gateway {gw.url}, Wyoming on port {gw.wyoming_port}  running, pid {before['pid']}  restarts 0" in table.stdout
    ), table.stdout
    config = yaml.safe_load(gw.hub.config_path.read_text())
    moved = free_port()
    config["gateway"]["port"] = moved
    gw.hub.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    gw.hub.proc.send_signal(signal.SIGHUP)
    after = until(lambda: (s := gw.hub.status()["gateway"])["running"] and s["pid"] != before["pid"] and s)
    assert after["url"] == f"http://127.0.0.1:{moved}" and after["restarts"] == 0 and after["last_exit"] == "", after
    wait_ready(after["url"])
    with pytest.raises(OSError):  # nothing listens on the old port any more
        urllib.request.urlopen(gw.url + "/healthz", timeout=5)
    log = gw.hub.log()
    assert "gateway.port changed: restarting the gateway" in log and "to apply the new gateway section" in log, log[
        -3000:
    ]
