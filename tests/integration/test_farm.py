"""The worker farm with real processes and sockets, driven through the SDK. The ``echo`` provider stands in
for a model here only to inject faults and check plumbing; transcription itself is proven in test_whisper.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from hub import protocol, shm
from hub.client import AsyncHubClient, HubClient
from hub.errors import (
    AcquireTimeout,
    BadRequest,
    HubUnreachable,
    InvalidAudio,
    JobTimeout,
    PoolBusy,
    ProviderUnavailable,
    ShuttingDown,
    UnknownProvider,
    WorkerCrashed,
)
from hub.protocol import MsgType
from tests.conftest import ROOT, Hub, echo_provider, free_port, start_hub, wait_for
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(90)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)


@pytest.fixture(scope="module")
def farm_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub for the tests that leave its pools as they found them: a default echo pool, a second one and a
    disabled one."""
    providers = {
        "echo": echo_provider(max_consecutive_failures=2),
        "slow": echo_provider(),
        "off": {"type": "echo", "enabled": False},
    }
    started = start_hub(tmp_path_factory.mktemp("farm"), providers)
    yield started
    assert started.stop() == 0


def test_echo_round_trip_through_shared_memory_and_inline(farm_hub: Hub) -> None:
    hub = farm_hub
    inline_before = hub.status()["hub"]["inline_bytes"]
    with hub.client() as client:
        result = client.transcribe(TONE)
        assert result.text == echo_text(TONE) and result.worker.startswith("echo-") and result.provider == "echo"
        assert hub.status()["hub"]["inline_bytes"] == inline_before, "shared-memory PCM must not cross the supervisor"
    with hub.client(use_shm=False) as remote:
        assert remote.transcribe(TONE).text == echo_text(TONE)
    assert hub.status()["hub"]["inline_bytes"] == inline_before + TONE.nbytes


def _states(hub, provider: str = "echo") -> list[str]:
    return [w["state"] for w in hub.status()["providers"][provider]["workers"]]


def test_status_shape(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=3), "off": {"type": "echo", "enabled": False}})
    status = hub.status()
    echo = status["providers"]["echo"]
    assert {"type", "pool_enabled", "size", "min_size", "max_size", "queue_depth", "workers"} <= set(echo)
    assert (echo["type"], echo["size"], echo["min_size"], echo["max_size"], echo["queue_depth"]) == ("echo", 2, 2, 3, 0)
    assert all({"id", "pid", "state", "device"} <= set(w) for w in echo["workers"])
    assert {w["state"] for w in echo["workers"]} == {"idle"} and status["hub"]["ready"]
    assert status["providers"]["off"]["enabled"] is False
    assert "hub ready in" in hub.log()


def test_pools_of_one_type_side_by_side_and_provider_errors(farm_hub: Hub) -> None:
    with farm_hub.client() as client:
        assert client.transcribe(TONE).provider == "echo"  # the first enabled provider is the default
        assert client.transcribe(TONE, "slow").worker.startswith("slow-")
        with pytest.raises(UnknownProvider, match="no provider named 'nope'; this hub serves: echo, slow"):
            client.transcribe(TONE, "nope")
        with pytest.raises(ProviderUnavailable, match="disabled"):
            client.transcribe(TONE, "off")
        with pytest.raises(BadRequest, match="not supported by echo providers"):
            client.transcribe(TONE, bogus_option=1)


def test_pool_busy_when_the_queue_is_full(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_queue=1)})
    errors: list[Exception] = []

    def slow() -> None:
        with hub.client() as c:
            try:
                c.transcribe(TONE, sleep=3.0)
            except Exception as exc:  # collected and checked below
                errors.append(exc)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    threads[0].start()
    wait_for(lambda: _states(hub) == ["busy"], what="the first job running")
    threads[1].start()
    wait_for(lambda: hub.status()["providers"]["echo"]["queue_depth"] == 1, what="the second job queued")
    with hub.client() as client:
        with pytest.raises(PoolBusy, match="max_queue=1"):
            client.transcribe(TONE)
    assert all(t.is_alive() for t in threads), "POOL_BUSY must come at once, not once the queue has moved"
    for t in threads:
        t.join(30)
    assert errors == []


def test_acquire_timeout(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, acquire_timeout=0.5)})

    def block() -> None:
        with hub.client() as c:
            c.transcribe(TONE, sleep=4.0)

    blocker = threading.Thread(target=block)
    blocker.start()
    wait_for(lambda: _states(hub) == ["busy"], what="the blocking job running")
    with hub.client() as client:
        started = time.monotonic()
        with pytest.raises(AcquireTimeout, match="no echo worker became free"):
            client.transcribe(TONE)
        assert time.monotonic() - started >= 0.45  # not before pool.acquire_timeout
    assert blocker.is_alive(), "ACQUIRE_TIMEOUT must come at its timeout, not once the worker is free"
    blocker.join(30)


def test_invalid_audio_from_the_sdk_leaves_the_hub_serving(farm_hub: Hub, tmp_path: Path) -> None:
    hub = farm_hub
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio" * 100)
    bad_inputs = [
        junk,
        np.array([], dtype=np.float32),
        np.array([0.0, np.nan], dtype=np.float32),
        np.zeros(8, np.float64),
    ]
    with hub.client() as client:
        for audio in bad_inputs:
            with pytest.raises(InvalidAudio):
                client.transcribe(audio)
        assert client.transcribe(TONE).text == echo_text(TONE)


def _raw(endpoint: str, frames: list[bytes], timeout_ms: int = 5000) -> protocol.Message:
    """Send frames the SDK would never send, and read the answer."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "the hub did not answer"
        return protocol.parse(sock.recv_multipart())
    finally:
        sock.close()
        ctx.term()


def test_hostile_requests_get_typed_errors_and_the_hub_carries_on(farm_hub: Hub) -> None:
    hub = farm_hub
    prefix = hub.status()["hub"]["id"]
    nan = np.array([0.0, np.nan], dtype=np.float32)

    def transcribe(audio: dict, payload: bytes | None = None) -> protocol.Message:
        return _raw(hub.endpoint, protocol.build(MsgType.TRANSCRIBE, "r1", {"audio": audio}, payload))

    cases = [
        (transcribe({"samples": 2}, nan.tobytes()), "INVALID_AUDIO", "NaN"),  # the worker checks too
        (transcribe({"samples": 4, "shm": "asrhub_other_1_ab"}), "INVALID_AUDIO", "not one of this hub"),
        (transcribe({"samples": 4, "shm": f"asrhub_{prefix}_1_abcdef"}), "INVALID_AUDIO", "does not exist"),
        (_raw(hub.endpoint, [b"\x07", b"STATUS", b"1", b"{}"]), "BAD_REQUEST", "protocol version"),
        (_raw(hub.endpoint, [b"garbage"]), "BAD_REQUEST", "frames"),
        (_raw(hub.endpoint, protocol.build(MsgType.READY, "x")), "BAD_REQUEST", "not accepted"),
    ]
    for msg, code, fragment in cases:
        assert msg.type is MsgType.ERROR and msg.body["code"] == code and fragment in msg.body["message"], msg.body
    with shm.create_pcm(shm.hub_prefix(prefix), np.zeros(2, np.float32)) as small:
        msg = transcribe({"samples": 1000, "shm": small.name})
        assert msg.body["code"] == "INVALID_AUDIO" and "fewer than" in msg.body["message"]
    with hub.client() as client:
        assert client.transcribe(TONE).text == echo_text(TONE)


def test_a_client_timeout_cancels_and_the_worker_stays_usable(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1)})
    with hub.client() as client:
        started = time.monotonic()
        with pytest.raises(JobTimeout, match="client's timeout"):
            client.transcribe(TONE, sleep=2.0, timeout=0.3)
        assert time.monotonic() - started < 2.0, "the client must give up at its timeout, not when the job ends"
        assert client.transcribe(TONE, timeout=10).text == echo_text(TONE)


def test_no_supervisor_is_a_clear_error_not_a_hang() -> None:
    with HubClient(f"tcp://127.0.0.1:{free_port()}", timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(HubUnreachable, match="is `python -m hub.supervisor` running"):
            client.transcribe(TONE)
        assert time.monotonic() - started < 2.0


def test_a_crashed_worker_is_retried_then_reported_and_replaced(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, retry_on_crash=1)})
    first_pid = hub.worker_pids()[0]
    with hub.client() as client:
        with pytest.raises(WorkerCrashed, match="exit status 9"):
            client.transcribe(TONE, exit=9)  # the retry runs the same job, so its worker crashes too
        assert client.transcribe(TONE, timeout=20).text == echo_text(TONE)  # the replacement serves
    assert hub.log().count("retrying on another worker") == 1
    assert hub.log().count("exit status 9") >= 2 and first_pid not in hub.worker_pids()


def test_sigkill_of_a_busy_worker_retries_the_job_elsewhere(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})
    with hub.client() as client:
        result: list = []
        t = threading.Thread(target=lambda: result.append(client.transcribe(TONE, sleep=1.0)))
        t.start()
        wait_for(lambda: "busy" in _states(hub), what="a busy worker")
        busy = [w for w in hub.status()["providers"]["echo"]["workers"] if w["state"] == "busy"]
        os.kill(busy[0]["pid"], signal.SIGKILL)
        t.join(20)
        assert result and result[0].text == echo_text(TONE) and result[0].worker != busy[0]["id"]
    assert "killed by SIGKILL" in hub.log()


def test_a_hung_job_times_out_and_a_fresh_worker_takes_the_next(hub_factory) -> None:
    hub = hub_factory(
        {"echo": echo_provider(min_size=1, max_size=1, job_timeout=1.0, job_timeout_per_audio_second=0.0)}
    )
    with hub.client() as client:
        started = time.monotonic()
        with pytest.raises(JobTimeout, match="1 s deadline"):
            client.transcribe(TONE, hang=True, timeout=60)
        assert time.monotonic() - started < 30, "the job's deadline must end it, not the client's timeout"
        assert client.transcribe(TONE, timeout=20).text == echo_text(TONE)


def test_an_unloadable_model_degrades_its_provider_only(hub_factory, tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    hub = hub_factory(
        {"echo": echo_provider(), "broken": {"type": "whisper", "model": str(empty), "device": "cpu"}}, ready=False
    )
    with hub.client() as client:
        deadline = time.monotonic() + 30
        while not (broken := client.status()["providers"]["broken"])["degraded"]:
            assert time.monotonic() < deadline, hub.log()
            time.sleep(0.2)
        assert "cannot load whisper model" in broken["last_error"] and str(empty) in broken["last_error"]
        with pytest.raises(ProviderUnavailable, match="cannot load whisper model"):  # not an acquire timeout
            client.transcribe(TONE, "broken")
        assert client.transcribe(TONE, "echo").text == echo_text(TONE)


def test_pool_grows_under_load_and_16_concurrent_requests_succeed(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=3)})
    signals = [(0.05 * (i + 1) * np.ones(1600 * (i + 1))).astype(np.float32) for i in range(16)]
    with hub.client() as client:
        results: dict[int, str] = {}

        def run(i: int) -> None:
            results[i] = client.transcribe(signals[i], sleep=0.3).text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == {i: echo_text(s) for i, s in enumerate(signals)}
    assert hub.status()["providers"]["echo"]["size"] == 3


def test_async_client_many_concurrent_requests_and_streaming(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, max_queue=256)})

    async def main() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=30) as client:
            results = await asyncio.gather(*(client.transcribe(TONE * (1 + i % 3)) for i in range(200)))
            assert [r.text for r in results] == [echo_text(TONE * (1 + i % 3)) for i in range(200)]
            events = [e async for e in client.transcribe_stream(TONE, segments=3)]
            assert [type(e).__name__ for e in events] == ["Segment"] * 3 + ["Transcript"]
            assert [e.start for e in events[:3]] == sorted(e.start for e in events[:3])
            with pytest.raises(InvalidAudio):
                await client.transcribe(np.array([], dtype=np.float32))
            assert (await client.status())["hub"]["ready"]

    asyncio.run(main())


def test_sync_stream_yields_segments_in_order_before_the_result(farm_hub: Hub) -> None:
    with farm_hub.client() as client:
        stream = client.transcribe_stream(TONE, segments=4)
        segments = []
        for segment in stream:
            assert stream.transcript is None  # segments arrive before the totals
            segments.append(segment)
        assert [s.text[-2:] for s in segments] == ["#1", "#2", "#3", "#4"]
        assert stream.transcript is not None and stream.transcript.segments == tuple(segments)


def _client_in_subprocess(endpoint: str, group: bool) -> tuple[subprocess.Popen, str]:
    code = (
        "import sys, numpy as np\n"
        "from hub.client import HubClient\n"
        "import hub.shm as shm\n"
        "orig = shm.SegmentPool.lease\n"
        "def tell(pool, pcm):\n"
        "    seg = orig(pool, pcm); print(seg.name, flush=True); return seg\n"
        "shm.SegmentPool.lease = tell\n"
        f"HubClient({endpoint!r}).transcribe(np.ones(16000, np.float32) * 0.1, sleep=30)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=group
    )
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("whole_group", [False, True])
def test_segments_of_a_client_killed_mid_request_are_removed(hub_factory, whole_group: bool) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1)}, hub={"drain_timeout": 1})
    proc, name = _client_in_subprocess(hub.endpoint, whole_group)
    assert name in shm.list_segments()
    wait_for(lambda: _states(hub) == ["busy"], what="the job running")
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)  # the client's resource tracker dies with it
    else:
        proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 5  # the supervisor sweeps orphans every 2 s
    while name in shm.list_segments():
        assert time.monotonic() < deadline, f"{name} outlived its client"
        time.sleep(0.1)


def test_segment_is_released_when_the_worker_is_killed_mid_job(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, retry_on_crash=0)})
    prefix = shm.hub_prefix(hub.status()["hub"]["id"])
    with hub.client() as client:
        errors: list[Exception] = []

        def run() -> None:
            try:
                client.transcribe(TONE, sleep=5)
            except WorkerCrashed as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: _states(hub) == ["busy"], what="the job running")
        assert shm.list_segments(prefix)
        os.kill(hub.worker_pids()[0], signal.SIGKILL)
        t.join(10)
    assert len(errors) == 1 and shm.list_segments(prefix) == []


def test_sigterm_drains_jobs_in_flight_and_exits_cleanly(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})
    pids = hub.worker_pids()
    prefix = shm.hub_prefix(hub.status()["hub"]["id"])
    results: list = []

    def run() -> None:
        with hub.client() as c:
            results.append(c.transcribe(TONE, sleep=1.0).text)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: _states(hub) == ["busy", "busy"], what="both jobs running")
    hub.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM: shutting down" in hub.log(), what="the drain to begin")
    with hub.client() as client:
        with pytest.raises(ShuttingDown):  # an answer: a supervisor that stopped reading would not give one
            client.transcribe(TONE, timeout=5)
    for t in threads:
        t.join(10)
    assert hub.proc.wait(15) == 0
    assert results == [echo_text(TONE)] * 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert shm.list_segments(prefix) == []


def test_a_stream_makes_its_segment_only_when_iterated_and_a_closed_client_says_so(farm_hub: Hub) -> None:
    client = farm_hub.client()
    before = set(shm.list_segments())
    stream = client.transcribe_stream(TONE)
    assert set(shm.list_segments()) == before  # nothing made yet: a stream never iterated leaks nothing
    assert [s.text for s in stream] == [f"{echo_text(TONE)} #1"]
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.transcribe(TONE)


def test_wrongly_typed_options_are_bad_requests_and_spare_the_worker(farm_hub: Hub) -> None:
    hub = farm_hub
    pids = hub.worker_pids()
    with hub.client() as client:
        for options in ({"sleep": "long"}, {"segments": 0}, {"hang": "yes"}, {"language": 5}):
            with pytest.raises(BadRequest, match="must be"):
                client.transcribe(TONE, **options)
        assert client.transcribe(TONE).text == echo_text(TONE)
    assert hub.worker_pids() == pids  # bad requests do not count as the model failing (max_consecutive_failures=2)


def test_a_client_whose_hub_went_away_is_told_at_once(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider()})
    with hub.client(timeout=20) as client:
        assert client.transcribe(TONE).text == echo_text(TONE)
        in_flight: list[Exception] = []

        def run() -> None:
            try:
                client.transcribe(TONE, sleep=10)
            except HubUnreachable as exc:
                in_flight.append(exc)

        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: "busy" in _states(hub), what="the job running")
        hub.expected_exit = -signal.SIGKILL
        hub.proc.send_signal(signal.SIGKILL)  # the supervisor dies with a request in flight
        hub.proc.wait(10)
        t.join(5)
        assert in_flight and "closed while the request was in flight" in in_flight[0].message
        started = time.monotonic()
        with pytest.raises(HubUnreachable):
            client.status()
        assert time.monotonic() - started < 3.0

    async def main() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=2) as client:
            started = time.monotonic()
            with pytest.raises(HubUnreachable):
                await client.status()
            assert time.monotonic() - started < 5.0

    asyncio.run(main())


def test_async_client_wait_ready_and_scale(hub_factory, tmp_path: Path) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=3)}, ready=False)
    (tmp_path / "empty-model").mkdir()
    unready = hub_factory(
        {"broken": {"type": "whisper", "model": str(tmp_path / "empty-model"), "device": "cpu"}}, ready=False
    )

    async def main() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=30) as client:
            status = await client.wait_ready(timeout=60)
            assert status["hub"]["ready"] and status["providers"]["echo"]["size"] == 1
            assert await client.scale("echo", 3) == {"provider": "echo", "size": 3}
            deadline = time.monotonic() + 30
            while (await client.status())["providers"]["echo"]["size"] != 3:
                assert time.monotonic() < deadline, "the pool never reached 3"
                await asyncio.sleep(0.1)
            with pytest.raises(BadRequest, match=r"outside \[1, 3\]"):
                await client.scale("echo", 4)
            with pytest.raises(UnknownProvider):
                await client.scale("nope", 1)
        async with AsyncHubClient(f"tcp://127.0.0.1:{free_port()}", timeout=1) as nobody:
            with pytest.raises(HubUnreachable):
                await nobody.wait_ready(timeout=1.0)
        async with AsyncHubClient(unready.endpoint, timeout=30) as client:
            await client.status()  # it answers
            with pytest.raises(ProviderUnavailable, match="answers but was not ready"):
                await client.wait_ready(timeout=1.0)

    asyncio.run(main())
