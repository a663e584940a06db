"""``HubPool`` over real supervisors on loopback: balancing, failover on kill and drain, hubs found by name.

The hubs listen on 127.0.0.1, .2, .3 ... with one port, so ``dns+tcp://hubs.test:PORT`` resolves
(through a resolver the test changes at run time) the way a headless Service's name does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pytest

from hub.client.balance import (
    AsyncHubPool,
    Balancer,
    Capacity,
    Endpoints,
    HubPool,
    parse_endpoints,
    tcp_endpoint,
)
from hub.errors import HubError, HubUnreachable, PoolBusy, ShuttingDown
from hub.results import Segment, Transcript
from tests.conftest import DATA, ROOT, Hub, echo_provider, free_port, repeating
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(120)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)


class Names:
    """A resolver whose answer the test edits: ``hubs.test`` lists the addresses in ``self.addresses``."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.lock = threading.Lock()

    def __call__(self, name: str, port: int) -> list[str]:
        if name != "hubs.test":
            raise OSError(f"unknown name {name}")
        with self.lock:
            return list(self.addresses)

    def set(self, *addresses: str) -> None:
        with self.lock:
            self.addresses = list(addresses)


def start_at(hub_factory: Callable[..., Hub], address: str, port: int, **pool: Any) -> Hub:
    endpoint = f"tcp://{address}:{port}"
    hub = hub_factory({"echo": echo_provider(**pool)}, hub={"frontend": endpoint, "drain_timeout": 20}, ready=False)
    hub.endpoint = endpoint
    with hub.client() as client:
        client.wait_ready(timeout=60)
    return hub


def served(hub: Hub) -> int:
    return int(hub.status()["providers"]["echo"]["requests"])


def load(pool: HubPool, threads: int = 4) -> AbstractContextManager[Counter[str]]:
    """Echo requests from ``threads`` threads until the block ends; outcomes by code ("ok" for success)."""

    def one() -> str:
        try:
            text = pool.transcribe(TONE, sleep=0.03, timeout=15).text
        except HubError as exc:
            return exc.code
        return "ok" if text == echo_text(TONE) else f"wrong text: {text!r}"

    return repeating(one, threads)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_kill_drain_and_a_new_hub_lose_no_request(hub_factory: Callable[..., Hub]) -> None:
    port = free_port()
    names = Names("127.0.0.1", "127.0.0.2", "127.0.0.3")
    a, b, c = (start_at(hub_factory, f"127.0.0.{i}", port) for i in (1, 2, 3))
    with HubPool(
        f"dns+tcp://hubs.test:{port}", timeout=15, resolver=names, resolve_interval=0.5, probe_interval=0.3
    ) as pool:
        assert set(pool.wait_ready(timeout=30, hubs=3)["hubs"]) == {a.endpoint, b.endpoint, c.endpoint}
        with load(pool) as outcomes:
            wait_for(lambda: min(served(h) for h in (a, b, c)) >= 5, 20, "every hub to take requests")
            a.expected_exit = -signal.SIGKILL
            os.killpg(a.proc.pid, signal.SIGKILL)  # a pod lost with its node
            names.set("127.0.0.2", "127.0.0.3")
            wait_for(
                lambda: set(pool.status(timeout=2)["hubs"]) == {b.endpoint, c.endpoint},
                20,
                "the pool to drop the lost hub",
            )
            b.proc.send_signal(signal.SIGTERM)  # a pod drained for a rolling update
            names.set("127.0.0.3")
            before = served(c)
            wait_for(lambda: served(c) >= before + 10, 20, "the load to move to the hub left")
            assert b.proc.wait(20) == 0
            d = start_at(hub_factory, "127.0.0.4", port)
            names.set("127.0.0.3", "127.0.0.4")
            wait_for(lambda: served(d) >= 10, 20, "the new hub to take its share")
        assert outcomes["ok"] > 50
        assert outcomes == Counter(ok=outcomes["ok"]), f"failed requests: {outcomes}"
        assert set(pool.status()["hubs"]) == {c.endpoint, d.endpoint}


def test_busy_hub_sends_requests_to_the_other(hub_factory: Callable[..., Hub]) -> None:
    """A hub whose queue is full answers POOL_BUSY; the pool retries on the other hub, within the timeout."""
    busy = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_queue=1)})
    free = hub_factory({"echo": echo_provider(min_size=1, max_size=1)})
    with HubPool([busy.endpoint, free.endpoint], timeout=15, probe_interval=60) as pool:
        pool.wait_ready(timeout=30, hubs=2)
        with busy.client() as hog:  # fill the busy hub: one running, one queued
            threads = [
                threading.Thread(target=hog.transcribe, args=(TONE,), kwargs={"sleep": 3, "timeout": 20})
                for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            wait_for(lambda: busy.status()["providers"]["echo"]["queue_depth"] == 1, 10, "the busy hub's queue to fill")
            results = [pool.transcribe(TONE, timeout=10).text for _ in range(4)]
            for thread in threads:
                thread.join(20)
    assert results == [echo_text(TONE)] * 4
    assert served(free) == 4
    assert busy.status()["providers"]["echo"]["rejected"] >= 1, "no request was sent to the busy hub first"
    cli = [
        sys.executable,
        "-m",
        "hub.client",
        "--endpoint",
        busy.endpoint,
        "--endpoint",
        free.endpoint,
        "--timeout",
        "20",
    ]
    ran = subprocess.run(
        [*cli, "transcribe", str(DATA / "hello.wav")], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0 and ran.stdout.startswith("echo "), ran.stderr
    ran = subprocess.run([*cli, "status"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.count("echo (echo, pool)") == 2, ran.stdout + ran.stderr


class FakeClient:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint


def status(idle: int, queued: int, draining: bool = False) -> dict[str, Any]:
    echo = {"enabled": True, "workers_by_state": {"idle": idle}, "queue_depth": queued, "sessions": 0}
    return {"hub": {"shutting_down": draining}, "providers": {"echo": echo}}


def test_balancer_prefers_free_workers_then_fewest_in_flight() -> None:
    balancer: Balancer[Any] = Balancer(FakeClient)
    balancer.update({"tcp://a:1", "tcp://b:1"})
    a, b = balancer.members["tcp://a:1"], balancer.members["tcp://b:1"]
    balancer.probed(a, status(idle=0, queued=0))
    balancer.probed(b, status(idle=2, queued=0))
    assert balancer.choose("echo", set()) is b
    assert balancer.choose(None, set()) is b  # None: the hub's first enabled provider
    assert balancer.choose("echo", set()) is a  # b's two free workers are taken by our two: a tie, so fewest in flight
    assert b.capacity["echo"] == Capacity(free=2, sessions=0)
    balancer.failed(b, ShuttingDown("draining"))
    assert balancer.choose("echo", {"tcp://a:1"}) is None  # b drains, a is excluded


def test_vanished_and_unreachable_hubs_are_closed_after_their_requests() -> None:
    balancer: Balancer[Any] = Balancer(FakeClient)
    balancer.update({"tcp://a:1", "tcp://b:1"})
    a = balancer.choose("echo", set())
    assert a is not None
    assert balancer.update({"tcp://b:1"} if a.endpoint == "tcp://a:1" else {"tcp://a:1"}) == []  # still in flight
    assert balancer.release(a) == [a.client]
    (other,) = balancer.members.values()
    assert balancer.choose("echo", set()) is other
    balancer.failed(other, HubUnreachable("gone"))
    replacement = balancer.members[other.endpoint]
    assert replacement is not other and replacement.down and replacement.client is not other.client
    assert balancer.choose("echo", set()) is None  # down until a probe answers
    assert balancer.release(other) == [other.client]
    balancer.probed(replacement, status(idle=1, queued=0))
    assert balancer.choose("echo", set()) is replacement
    balancer.failed(replacement, PoolBusy("full"))
    assert not replacement.down and not replacement.draining  # busy is a refusal of one request, not of the hub


def test_endpoint_forms() -> None:
    assert parse_endpoints("tcp://a:5555") == Endpoints(("tcp://a:5555",), ())
    assert parse_endpoints(["tcp://a:1", "dns+tcp://asr-hub-zmq.ns.svc:5555"]) == Endpoints(
        ("tcp://a:1",), (("asr-hub-zmq.ns.svc", 5555),)
    )
    assert tcp_endpoint("fd00::1", 5555) == "tcp://[fd00::1]:5555"
    for bad in ([], "dns+tcp://name", "dns+tcp://:5555"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
    names = Names("127.0.0.1")
    found = parse_endpoints(["dns+tcp://hubs.test:7", "dns+tcp://nowhere.test:7"]).resolve(
        names, {("nowhere.test", 7): {"tcp://127.0.0.9:7"}}
    )
    assert found == {("hubs.test", 7): {"tcp://127.0.0.1:7"}, ("nowhere.test", 7): {"tcp://127.0.0.9:7"}}


def test_async_pool_streams_holds_sessions_and_fails_over(hub_factory: Callable[..., Hub]) -> None:
    a = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})
    b = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})

    async def main() -> Counter[str]:
        async with AsyncHubPool([a.endpoint, b.endpoint], timeout=15, probe_interval=0.3) as pool:
            await pool.wait_ready(timeout=30, hubs=2)
            stream = pool.transcribe_stream(TONE, segments=3)
            assert stream.transcript is None
            events = [e async for e in stream]
            assert [type(e) for e in events] == [Segment] * 3 + [Transcript]
            assert stream.transcript is events[-1]
            async with await pool.open_stream() as session:
                for start in range(0, TONE.size, 4000):
                    await session.send(TONE[start : start + 4000])
            assert session.transcript.duration == pytest.approx(1.0, abs=0.01) and session.transcript.text
            outcomes: Counter[str] = Counter()

            async def one() -> None:
                try:
                    assert (await pool.transcribe(TONE, sleep=0.2)).text == echo_text(TONE)
                    outcomes["ok"] += 1
                except HubError as exc:
                    outcomes[exc.code] += 1

            tasks = [asyncio.create_task(one()) for _ in range(12)]
            await asyncio.sleep(0.1)  # requests in flight on both hubs
            a.expected_exit = -signal.SIGKILL
            os.killpg(a.proc.pid, signal.SIGKILL)
            await asyncio.gather(*tasks)
            tasks = [asyncio.create_task(one()) for _ in range(12)]
            await asyncio.gather(*tasks)
            return outcomes

    outcomes = asyncio.run(asyncio.wait_for(main(), 60))
    assert outcomes == Counter(ok=24), outcomes
    assert served(b) >= 12


def test_sync_pool_streams_and_holds_a_session_on_its_hub(hub_factory: Callable[..., Hub]) -> None:
    a = hub_factory({"echo": echo_provider()})
    b = hub_factory({"echo": echo_provider()})
    with HubPool([a.endpoint, b.endpoint], timeout=15) as pool:
        stream = pool.transcribe_stream(TONE, segments=2)
        assert len(list(stream)) == 2 and stream.transcript is not None and stream.transcript.text == echo_text(TONE)
        with pool.open_stream() as session:
            session.send(TONE)
            assert session.worker is not None
        assert session.transcript.duration == pytest.approx(1.0, abs=0.01)
