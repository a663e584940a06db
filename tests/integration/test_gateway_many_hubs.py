"""One gateway in front of many hubs (``--hub A --hub B``, ``--hub dns+tcp://NAME:PORT``): real supervisors,
a real standalone gateway process, the real ``openai`` SDK and WebSocket client.

Requests spread over the hubs (each hub's own status counts them); a hub SIGKILLed under load costs no
HTTP request; /readyz stays 200 while one hub is ready and turns 503 when none is; a live session stays
on its hub; a DNS name, looked up in a hosts file the test edits, adds and drops hubs at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from websockets.sync.client import connect

from hub.client import CurveKeys
from hub.client.call import HELLO_TIMEOUT
from hub.gateway.hubs import providers, readiness
from tests.conftest import (
    DATA,
    ROOT,
    Hub,
    echo_provider,
    free_port,
    reference,
    repeating,
    wait_for,
    word_error_rate,
)
from tests.gateway_support import WHISPER, gateway_keys, http_get, wait_ready
from tests.models.test_gateway_live import STEPS_TEXT, frames, read_all, steps

pytestmark = pytest.mark.timeout(120)

ECHO = {"echo": echo_provider(min_size=2, max_size=2)}
HELLO = (DATA / "hello.wav").read_bytes()


@dataclass
class Front:
    """A standalone gateway process and where it listens."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.url + path)

    def gauge(self, name: str) -> float:
        status, text = self.get("/metrics")
        assert status == 200, text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., Front]]:
    """Start ``python -m hub.gateway --hub ...`` (after ``prefix``, a command that runs it); each one is stopped
    with SIGTERM afterwards and must exit 0 without a traceback in its log."""
    started: list[Front] = []

    def start(*hubs: str, args: tuple[str, ...] = (), prefix: tuple[str, ...] = ()) -> Front:
        port = free_port()
        log_path = tmp_path / f"gateway-{port}.log"
        command = [
            *prefix,
            sys.executable,
            "-m",
            "hub.gateway",
            *(a for h in hubs for a in ("--hub", h)),
            "--port",
            str(port),
            *args,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        front = Front(proc, port, log_path)
        started.append(front)
        return front

    yield start
    for front in started:
        front.proc.send_signal(signal.SIGTERM)
        code = front.proc.wait(30)
        log = front.log_path.read_text()
        assert code == 0 and "Traceback" not in log, log[-5000:]


def served(hub: Hub, curve: CurveKeys | None = None, provider: str = "echo") -> int:
    with hub.client(curve=curve) as client:
        return int(client.status()["providers"][provider]["requests"])


def sdk_load(front: Front, threads: int = 4) -> AbstractContextManager[Counter[str]]:
    """OpenAI SDK transcriptions from ``threads`` threads until the block ends; outcomes counted ("ok", else the
    HTTP status or the exception's type)."""
    local = threading.local()  # one SDK client (one connection pool) per thread

    def one() -> str:
        if not hasattr(local, "client"):
            local.client = front.sdk()
        try:
            text = local.client.audio.transcriptions.create(model="whisper-1", file=("hello.wav", HELLO)).text
        except openai.APIStatusError as exc:
            return f"{exc.status_code}: {exc.message}"
        except openai.APIError as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok" if text.startswith("echo") else f"wrong text: {text!r}"

    return repeating(one, threads)


# --- the view of many hubs, without processes -------------------------------------------------------


def hub_status(ready: bool = True, draining: bool = False, **providers: dict[str, Any]) -> dict[str, Any]:
    return {"hub": {"ready": ready, "shutting_down": draining}, "providers": providers}


def test_ready_while_any_hub_is_ready_and_why_not_otherwise() -> None:
    gone = {"error": {"code": "HUB_UNREACHABLE", "message": "no ASR Hub answered"}}
    up = readiness({"tcp://a:1": gone, "tcp://b:1": hub_status(), "tcp://c:1": hub_status(draining=True)}, "a, b, c")
    assert (up.ready, up.problem, up.hubs_ready) == (True, "", 1)
    down = readiness(
        {"tcp://a:1": gone, "tcp://b:1": hub_status(ready=False), "tcp://c:1": hub_status(draining=True)}, "x"
    )
    assert not down.ready and down.hubs_ready == 0
    assert down.problem == (
        "none of the 3 hubs is ready: the hub at tcp://a:1 does not answer (HUB_UNREACHABLE): no ASR Hub answered; "
        "the hub at tcp://b:1 has not got its pools ready yet; the hub at tcp://c:1 is draining (shutting down)"
    )
    alone = readiness({"tcp://c:1": hub_status(draining=True)}, "tcp://c:1")
    assert alone.problem == "the hub at tcp://c:1 is draining (shutting down)"
    assert readiness({}, "dns+tcp://hubs.test:5555").problem == "no hub found at dns+tcp://hubs.test:5555"


def test_models_are_the_union_of_the_hubs_that_answer() -> None:
    whisper = {"enabled": True, "type": "whisper", "degraded": True}
    hubs = {
        "tcp://a:1": hub_status(whisper=whisper, off={"enabled": False}),
        "tcp://b:1": hub_status(draining=True, whisper={**whisper, "degraded": False}, echo={"enabled": True}),
        "tcp://c:1": {"error": {"code": "HUB_UNREACHABLE", "message": "gone"}},
    }
    assert providers(hubs) == [
        {
            "id": "whisper",
            "enabled": True,
            "type": "whisper",
            "degraded": False,
        },  # degraded only where every hub says so
        {"id": "echo", "enabled": True},
    ]
    assert providers({"tcp://c:1": hubs["tcp://c:1"]}) == []


# --- real hubs, a real gateway --------------------------------------------------------------------


def test_requests_spread_over_hubs_and_survive_a_killed_one(
    hub_factory: Callable[..., Hub], gateway_process: Callable[..., Front]
) -> None:
    a, b = hub_factory(ECHO), hub_factory(ECHO)
    front = gateway_process(a.endpoint, b.endpoint)
    wait_ready(front.url)
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 2, 10, "both hubs ready in the gateway's view")
    assert [m.id for m in front.sdk().models.list().data] == ["echo"]
    with sdk_load(front) as outcomes:
        wait_for(lambda: min(served(a), served(b)) >= 10, 30, "both hubs to serve requests")
        a.expected_exit = -signal.SIGKILL
        os.killpg(a.proc.pid, signal.SIGKILL)  # a hub lost with requests in flight on it
        a.proc.wait(10)
        before = served(b)
        readyz = []
        for _ in range(10):
            readyz.append(front.get("/readyz")[0])
            time.sleep(0.2)
        wait_for(lambda: served(b) >= before + 20, 30, "the hub left to take the load")
    assert readyz == [200] * 10, "/readyz must stay 200 while one hub is ready"
    assert outcomes["ok"] > 30
    assert outcomes == Counter(ok=outcomes["ok"]), f"failed HTTP requests: {outcomes}"
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 1, 10, "the gateway to count one hub ready")
    assert b.stop() == 0  # drain the last hub: nothing is left to serve
    wait_for(lambda: front.get("/readyz")[0] == 503, 10, "/readyz to turn 503")
    status, body = front.get("/readyz")
    assert status == 503 and "none of the 2 hubs is ready" in body and a.endpoint in body and b.endpoint in body, body


def test_live_session_stays_on_its_hub(hub_factory: Callable[..., Hub], gateway_process: Callable[..., Front]) -> None:
    """A WebSocket session keeps its hub to the end, even when the other hub dies in the middle of it."""
    hubs = [hub_factory(ECHO), hub_factory(ECHO)]
    front = gateway_process(*(h.endpoint for h in hubs))
    wait_ready(front.url)
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 2, 10, "both hubs ready in the gateway's view")
    audio = frames(steps(48000).astype("<f4").tobytes(), 8192)
    with connect(f"ws://127.0.0.1:{front.port}/v1/stream", open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"model": "echo", "sample_rate": 48000, "encoding": "pcm_f32le"}))
        for frame in audio[: len(audio) // 2]:
            ws.send(frame)

        def sessions() -> list[int]:
            return [int(h.status()["providers"]["echo"]["sessions"]) for h in hubs]

        wait_for(lambda: sorted(sessions()) == [0, 1], 10, "the session to open on one hub")
        holder, other = hubs if sessions()[0] == 1 else hubs[::-1]
        other.expected_exit = -signal.SIGKILL
        os.killpg(other.proc.pid, signal.SIGKILL)
        for frame in audio[len(audio) // 2 :]:
            ws.send(frame)
        ws.send(json.dumps({"type": "close"}))
        outcome = read_all(ws)
    assert outcome.transcript["text"] == STEPS_TEXT
    wait_for(lambda: holder.status()["providers"]["echo"]["sessions"] == 0, 10, "the session to end on its hub")


def test_whisper_through_two_hubs_with_the_openai_sdk(
    hub_factory: Callable[..., Hub], gateway_process: Callable[..., Front]
) -> None:
    whisper = {"whisper": {**WHISPER, "pool": {"min_size": 1, "max_size": 1}}}
    a, b = hub_factory(whisper), hub_factory(whisper)
    front = gateway_process(a.endpoint, b.endpoint)
    wait_ready(front.url)
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 2, 10, "both hubs ready in the gateway's view")
    client = front.sdk()
    for _ in range(2):
        text = client.audio.transcriptions.create(model="whisper-1", file=(DATA / "coffee.wav").open("rb")).text
        assert word_error_rate(reference("coffee"), text) <= 0.10, text
    deltas = [
        event.delta
        for event in client.audio.transcriptions.create(
            model="whisper-1", file=(DATA / "hello.wav").open("rb"), stream=True
        )
        if event.type == "transcript.text.delta"
    ]
    assert word_error_rate(reference("hello"), "".join(deltas)) <= 0.10, deltas
    assert served(a, provider="whisper") >= 1 and served(b, provider="whisper") >= 1
    assert served(a, provider="whisper") + served(b, provider="whisper") == 3


def test_curve_keys_reach_every_hub(
    hub_factory: Callable[..., Hub], gateway_process: Callable[..., Front], tmp_path: Path
) -> None:
    curve, secret, public = gateway_keys(tmp_path)
    a, b = (hub_factory(ECHO, hub=curve, ready=False) for _ in range(2))  # one server key pair for both
    front = gateway_process(a.endpoint, b.endpoint, args=("--client-key", secret, "--server-key", public))
    wait_ready(front.url)
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 2, 10, "both CURVE hubs ready in the gateway's view")
    client = front.sdk()
    keys_of_gateway = CurveKeys.load(secret, public)
    # requests one at a time go to the hub that last reported the most free capacity, so all of a few may go to
    # one hub until the next status probe (each second) evens the readings: send until both served, for 20 s
    deadline = time.monotonic() + 20
    while not (served(a, keys_of_gateway) >= 1 and served(b, keys_of_gateway) >= 1):
        assert time.monotonic() < deadline, "in 20 s of requests over CURVE, one hub served none"
        assert client.audio.transcriptions.create(model="echo", file=("hello.wav", HELLO)).text.startswith("echo")


def bind_hosts_file(hosts: Path) -> tuple[str, ...]:
    """A command prefix that runs its command with ``hosts`` as its /etc/hosts (a private mount namespace), so
    the system resolver answers from a file the test edits; skips when this machine cannot do that."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private /etc/hosts needs root and unshare(1) (util-linux)")
    prefix = ("unshare", "--mount", "sh", "-c", f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"')
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"cannot bind a hosts file in a mount namespace here: {probe.stderr.strip()}")
    return prefix


def test_dns_name_adds_and_drops_hubs(
    hub_factory: Callable[..., Hub], gateway_process: Callable[..., Front], tmp_path: Path
) -> None:
    """``--hub dns+tcp://hubs.test:PORT`` resolved through the system resolver from a hosts file that lists first
    one hub, then both, then only the second: the way a headless Service's name follows its ready pods."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 hubs.test\n")
    prefix = bind_hosts_file(hosts)
    port = free_port()
    first, second = (hub_factory(ECHO, args=("--frontend", f"tcp://127.0.0.{i}:{port}")) for i in (1, 2))
    front = gateway_process(f"dns+tcp://hubs.test:{port}", prefix=prefix)
    wait_ready(front.url)
    client = front.sdk()

    def transcribe(n: int) -> None:
        for _ in range(n):
            assert client.audio.transcriptions.create(model="echo", file=("hello.wav", HELLO)).text.startswith("echo")

    transcribe(4)
    assert (served(first), served(second)) == (4, 0)
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 hubs.test\n127.0.0.2 hubs.test\n")  # a pod became ready
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 2, 20, "the gateway to find the second hub")
    transcribe(6)
    assert served(second) >= 1 and served(first) + served(second) == 10  # the new hub takes work
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 hubs.test\n")  # the first pod left the Service
    wait_for(lambda: front.gauge("asr_hub_gateway_hubs_ready") == 1, 20, "the gateway to drop the first hub")
    before = served(first)
    transcribe(4)
    assert served(first) == before


def test_no_hub_is_a_502_within_the_hello_bound_not_the_request_timeout(gateway_process: Callable[..., Front]) -> None:
    """A gateway whose hub is not there answers 502 once the HELLO goes unanswered (hub.call.HELLO_TIMEOUT),
    not after its 600 s request timeout; /readyz says why meanwhile."""
    front = gateway_process(f"tcp://127.0.0.1:{free_port()}")

    def serving() -> bool:
        try:
            return front.get("/healthz")[0] == 200
        except OSError:  # not listening yet
            return False

    wait_for(serving, 30, "the gateway to serve")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as failed:
        front.sdk().audio.transcriptions.create(model="echo", file=("hello.wav", HELLO))
    assert failed.value.status_code == 502 and "no ASR Hub answered" in failed.value.message
    assert time.monotonic() - started < HELLO_TIMEOUT + 5
    assert front.get("/readyz")[0] == 503
