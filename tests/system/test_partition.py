"""A network partition: two hubs on two "hosts" (network namespaces), one ``HubPool`` on a third; one link cut.

The client gets a namespace of its own, joined to each hub's by a veth pair, with addresses
from the benchmarking range 198.18.0.0/15 and no default route anywhere: nothing the test
sends can leave the three namespaces, and none of it touches the machine's own network.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, free_port, live_in_group, supervisor_faults

pytestmark = pytest.mark.timeout(150)

TAG = f"{os.getpid() % 100000}"
CLIENT, HUB_A, HUB_B = f"asrc{TAG}", f"asra{TAG}", f"asrb{TAG}"
REQUEST_TIMEOUT = 6.0  # the link stays cut longer than this: a request caught there must fail over, not wait
LINKS = {HUB_A: ("198.18.1.1", "198.18.1.2"), HUB_B: ("198.18.2.1", "198.18.2.2")}  # (client side, hub side)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def client_end(hub_ns: str) -> str:
    return f"c{hub_ns}"


@pytest.fixture
def hosts() -> Iterator[None]:
    """Three namespaces: the client's, joined to each hub's by its own veth pair."""
    made: list[str] = []
    try:
        for ns in (CLIENT, HUB_A, HUB_B):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for hub_ns, (near, far) in LINKS.items():
            ip(
                "link",
                "add",
                client_end(hub_ns),
                "netns",
                CLIENT,
                "type",
                "veth",
                "peer",
                "name",
                "h" + hub_ns,
                "netns",
                hub_ns,
            )
            ip("-n", CLIENT, "addr", "add", f"{near}/30", "dev", client_end(hub_ns))
            ip("-n", hub_ns, "addr", "add", f"{far}/30", "dev", "h" + hub_ns)
            ip("-n", CLIENT, "link", "set", client_end(hub_ns), "up")
            ip("-n", hub_ns, "link", "set", "h" + hub_ns, "up")
    except (OSError, subprocess.CalledProcessError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        detail = exc.stderr.decode().strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        pytest.skip(f"cannot make network namespaces here ({detail}); the partition test needs root and `ip netns`")
    try:
        yield
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def start_in(ns: str, argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[str]:
    with open(log, "w") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], cwd=ROOT, stderr=out, start_new_session=True, text=True, **kwargs
        )


def stop(proc: subprocess.Popen[str], log: Path) -> list[str]:
    """SIGTERM the process's group and wait; what went wrong, as ``hub_factory`` checks it: an exit other than 0,
    a supervisor's log showing a bug, a process of its group left behind."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    text = log.read_text(errors="replace")
    problems = [f"{log.name}: {fault}" for fault in supervisor_faults(text)]
    if proc.returncode != 0:
        problems.append(f"{log.name}: exit status {proc.returncode}\n{text[-3000:]}")
    if left := live_in_group(proc.pid):
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        problems.append(f"{log.name}: processes left behind: {left}")
    return problems


def drive(endpoints: list[str], stop_path: str) -> None:
    """Run in the client's namespace: load the pool from three threads, report each half second on stdout.
    The load is ``repeating``'s: every exception counted, a request still hanging at the end reported."""
    from hub.client.balance import HubPool
    from hub.errors import HubError
    from tests.conftest import repeating
    from workers.echo import echo_text

    tone = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)

    with HubPool(endpoints, timeout=REQUEST_TIMEOUT, probe_interval=0.3) as pool:

        def one() -> str:
            try:
                text = pool.transcribe(tone, sleep=0.2, timeout=REQUEST_TIMEOUT).text
            except HubError as exc:
                return exc.code
            return "ok" if text == echo_text(tone) else f"wrong text: {text!r}"

        pool.wait_ready(timeout=60, hubs=2)
        outcomes: Counter[str] = Counter()
        try:
            with repeating(one, 3, join_timeout=30) as outcomes:
                while not os.path.exists(stop_path):
                    hubs = pool.status(timeout=0.5)["hubs"]
                    served = {e: s["providers"]["echo"]["requests"] if "hub" in s else None for e, s in hubs.items()}
                    print(json.dumps({"outcomes": outcomes, "served": served}), flush=True)
                    time.sleep(0.5)
        except AssertionError as exc:  # a load thread still running
            outcomes[str(exc)] += 1
    print(json.dumps({"final": outcomes}), flush=True)


class Reports:
    """The driver's lines, read on a thread; ``until`` waits for one that satisfies a predicate."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        assert proc.stdout is not None
        threading.Thread(target=lambda: [self.lines.put(json.loads(line)) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def until(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}; last report {self.last}"
            try:
                self.last = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(self.last):
                return self.last


def test_cut_link_fails_over_and_recovers(hosts: None, tmp_path: Path) -> None:
    port = free_port()
    endpoints = {ns: f"tcp://{far}:{port}" for ns, (_, far) in LINKS.items()}
    procs: list[tuple[subprocess.Popen[str], Path]] = []
    try:
        for ns, endpoint in endpoints.items():
            config = {
                "hub": {"frontend": endpoint, "allow_insecure": True, "runtime_dir": str(tmp_path / ns)},
                "providers": {"echo": {"type": "echo", "pool": {"min_size": 2, "max_size": 2}}},
            }
            (tmp_path / f"{ns}.yaml").write_text(yaml.safe_dump(config))
            argv = [sys.executable, "-m", "hub.supervisor", "--config", str(tmp_path / f"{ns}.yaml")]
            procs.append((start_in(ns, argv, tmp_path / f"{ns}.log"), tmp_path / f"{ns}.log"))
        stop_path = tmp_path / "stop"
        code = f"from tests.system.test_partition import drive; drive({list(endpoints.values())!r}, {str(stop_path)!r})"
        driver = start_in(CLIENT, [sys.executable, "-c", code], tmp_path / "driver.log", stdout=subprocess.PIPE)
        procs.append((driver, tmp_path / "driver.log"))
        reports = Reports(driver)
        a, b = endpoints[HUB_A], endpoints[HUB_B]
        reports.until(lambda r: all((n or 0) >= 5 for n in r["served"].values()), 60, "both hubs to serve")

        ip("-n", CLIENT, "link", "set", client_end(HUB_A), "down")
        cut_at = time.monotonic()
        cut = reports.until(lambda r: r["served"][a] is None, 10, "the pool to see hub A gone")
        reports.until(lambda r: r["served"][b] >= cut["served"][b] + 20, 30, "hub B to take the load")
        time.sleep(max(0.0, cut_at + REQUEST_TIMEOUT + 2 - time.monotonic()))

        ip("-n", CLIENT, "link", "set", client_end(HUB_A), "up")
        served_before = reports.until(lambda r: r["served"][a] is not None, 30, "hub A to be reachable again")[
            "served"
        ][a]
        reports.until(lambda r: (r["served"][a] or 0) >= served_before + 10, 30, "hub A to take requests again")

        stop_path.touch()
        final = reports.until(lambda r: "final" in r, 40, "the driver to finish")["final"]
        assert final.get("ok", 0) > 30
        assert final == {"ok": final["ok"]}, (
            f"requests failed across the partition: {final}\n{(tmp_path / 'driver.log').read_text()}"
        )
        assert driver.wait(10) == 0
    finally:
        problems = [problem for proc, log in procs for problem in stop(proc, log)]
    assert not problems, "\n\n".join(problems)
