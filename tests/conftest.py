"""Fixtures that start real supervisors (``python -m hub.supervisor``) on free ports and stop them after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml

from bench.streaming import word_error_rate  # noqa: F401  (the tests' WER is the benchmark's)
from hub import shm
from hub.client import HubClient
from hub.errors import HubError

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CLIPS = ("hello", "coffee", "stella", "weather")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Hub:
    """A running supervisor process and how to reach it."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path

    def client(self, **kwargs: Any) -> HubClient:
        return HubClient(self.endpoint, **{"timeout": 30.0, **kwargs})

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def worker_pids(self) -> list[int]:
        return [w["pid"] for p in self.status()["providers"].values() for w in p["workers"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; also fails the test if the supervisor hit a bug on the way (an internal error)."""
        assert "internal error" not in self.log(), self.log()[-5000:]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"supervisor did not stop within {timeout} s:\n{self.log()}") from None
        return int(self.proc.returncode)


def start_hub(
    tmp_path: Path,
    providers: dict[str, Any],
    hub: dict[str, Any] | None = None,
    ready: bool = True,
    gateway: dict[str, Any] | None = None,
) -> Hub:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "hub": {"frontend": endpoint, "runtime_dir": str(tmp_path / "run"), **(hub or {})},
        "providers": providers,
        **({"gateway": gateway} if gateway is not None else {}),
    }
    config_path = tmp_path / f"hub-{endpoint.rsplit(':', 1)[1]}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))  # in the test's order: its first provider is the default
    log_path = config_path.with_suffix(".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.supervisor", "--config", str(config_path)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a test can kill it whole
        )
    started = Hub(endpoint, proc, config_path, log_path)
    if ready:
        try:
            with started.client() as c:
                c.wait_ready(timeout=60)
        except BaseException:
            started.stop()
            raise
    return started


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """Start supervisors for one test; every one is stopped and checked for leftovers afterwards."""
    hubs: list[Hub] = []

    def factory(
        providers: dict[str, Any], hub: dict[str, Any] | None = None, ready: bool = True, gateway: dict[str, Any] | None = None
    ) -> Hub:
        started = start_hub(tmp_path, providers, hub, ready, gateway)
        hubs.append(started)
        return started

    yield factory
    for started in hubs:
        started.stop()
        pids = [int(p) for p in subprocess.run(["pgrep", "-g", str(started.proc.pid)], capture_output=True, text=True).stdout.split()]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        assert not pids, f"processes left behind by the supervisor: {pids}"


def _ours(name: str) -> bool:
    """A segment this test session answers for: made by this process, a descendant, or a process now gone
    (other programs running beside the suite, another test run among them, keep theirs)."""
    pid = shm.owner_pid(name)
    if pid is None:
        return False
    try:
        owner = psutil.Process(pid)
        return pid == os.getpid() or os.getpid() in {p.pid for p in owner.parents()}
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """After the whole suite, /dev/shm holds no segment of ours."""
    before = set(shm.list_segments())
    yield
    deadline = time.monotonic() + 5
    while (left := {n for n in set(shm.list_segments()) - before if _ours(n)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


@contextmanager
def steady_load(hub: Hub, clients: int = 3) -> Iterator[Counter[str]]:
    """Echo requests from ``clients`` threads until the block ends; yields the outcomes by code ("ok" for success)."""
    from workers.echo import echo_text

    tone = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
    stop = threading.Event()
    outcomes: Counter[str] = Counter()

    def load() -> None:
        with hub.client() as client:
            while not stop.is_set():
                try:
                    assert client.transcribe(tone, sleep=0.05, timeout=30).text == echo_text(tone)
                    outcomes["ok"] += 1
                except HubError as exc:
                    outcomes[exc.code] += 1

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def echo_provider(**pool: Any) -> dict[str, Any]:
    return {"type": "echo", "pool": {"min_size": 1, "max_size": 2, **pool}}


def reference(name: str) -> str:
    return (DATA / f"{name}.txt").read_text().strip()
