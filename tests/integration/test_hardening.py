"""Hostile input, size limits and authenticated remote access."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub import protocol
from hub.client import AsyncHubClient, CurveKeys, HubClient
from hub.config import ConfigError, parse_config
from hub.errors import AuthFailed, HubError, InvalidAudio
from hub.keys import main as make_keys
from tests.conftest import (
    DATA,
    ROOT,
    echo_provider,
    free_port,
    reference,
    word_error_rate,
)
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(180)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@given(st.lists(st.binary(max_size=64), max_size=7))
@settings(max_examples=500)
def test_parse_accepts_or_refuses_with_bad_request_only(frames: list[bytes]) -> None:
    try:
        msg = protocol.parse(frames)
    except HubError as exc:
        assert exc.code == "BAD_REQUEST"
    else:
        assert isinstance(msg.body, dict) and msg.type in protocol.MsgType


@given(st.sampled_from(list(protocol.MsgType)), st.dictionaries(st.text(max_size=10), json_values, max_size=6))
@settings(max_examples=300)
def test_well_framed_messages_round_trip(msg_type: protocol.MsgType, body: dict) -> None:
    msg = protocol.parse(protocol.build(msg_type, "id-1", body))
    assert (msg.type, msg.id, msg.body) == (msg_type, "id-1", body)


@given(json_values, st.none() | st.binary(max_size=64))
@settings(max_examples=500)
def test_job_fields_are_checked_into_typed_errors(audio: object, payload: bytes | None) -> None:
    body = {"audio": audio, "options": audio, "timeout": audio}
    for check in (
        lambda: protocol.parse_audio_ref(body, payload, max_samples=1000),
        lambda: protocol.parse_options(body),
        lambda: protocol.parse_timeout(body),
    ):
        try:
            check()
        except HubError as exc:
            assert exc.code in ("BAD_REQUEST", "INVALID_AUDIO")


@given(json_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_provider_shape_is_a_config_error_or_a_config(data: object) -> None:
    try:
        parse_config({"providers": {"echo": data}})
    except ConfigError:
        pass


@given(json_values)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_hub_shape_is_a_config_error_or_a_config(data: object) -> None:
    try:
        parse_config({"hub": data, "providers": {"echo": {}}})
    except ConfigError:
        pass


def _fuzz_frames(rng: random.Random, hub_id: str) -> list[bytes]:
    """One hostile message: noise, wrong versions and types, and well-framed messages with bad fields."""
    kind = rng.randrange(6)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 8))]
    if kind == 1:
        return [bytes([rng.randrange(256)]), b"TRANSCRIBE", b"1", b"{}"]
    if kind == 2:
        return [b"\x01", rng.choice([b"JOB", b"READY", b"RESULT", b"HEARTBEAT", b"??"]), b"x", b"{}"]
    bodies = [
        {"audio": {"samples": rng.randrange(-5, 10**9)}},
        {"audio": {"samples": 4, "shm": f"asrhub_{hub_id}_{rng.randrange(1, 99999)}_{rng.randbytes(4).hex()}"}},
        {"audio": {"samples": 4, "shm": "../../etc/passwd"}},
        {"audio": {"samples": 2}, "provider": rng.choice([None, 5, "nope", "echo", ["x"]])},
        {"audio": {"samples": 2}, "options": {"sleep": "x", "segments": -3}},
        {"audio": {"samples": 2}, "options": {"bogus": 1}},
        {"audio": {"samples": 2}, "timeout": rng.choice([0, -1, "x", 1e308])},
        {"provider": "echo", "size": rng.randrange(-3, 10)},
        {"probe": "/etc/passwd", "nonce": "x"},
    ]
    msg_type = rng.choice([b"TRANSCRIBE", b"SCALE", b"HELLO", b"CANCEL", b"STATUS"])
    frames = [b"\x01", msg_type, str(rng.randrange(10**6)).encode(), json.dumps(rng.choice(bodies)).encode()]
    if rng.random() < 0.5:
        nan = np.array([np.nan, 0.0], dtype=np.float32)
        frames.append(rng.choice([nan.tobytes(), rng.randbytes(rng.randrange(0, 12))]))
    return frames


def test_thousands_of_malformed_messages_leave_the_hub_transcribing(hub_factory) -> None:
    hub = hub_factory(
        {
            "whisper": {"model": "tiny.en", "device": "cpu", "pool": {"min_size": 1, "max_size": 1}},
            "echo": echo_provider(min_size=1, max_size=2),
        }
    )
    before = hub.status()
    hub_id = before["hub"]["id"]
    rng = random.Random(1234)
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
    try:
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(hub.endpoint)
        replies: list[protocol.Message] = []

        def collect(wait_ms: int) -> None:
            for sock in socks:
                while sock.poll(wait_ms):
                    replies.append(protocol.parse(sock.recv_multipart()))  # every reply is well formed

        sent = 0
        for i in range(3000):
            frames = _fuzz_frames(rng, hub_id)
            socks[i % 4].send_multipart(frames)
            sent += frames[:2] != [b"\x01", b"CANCEL"]  # a cancel is never answered; everything else once
            collect(0)
        deadline = time.monotonic() + 60  # a few well-formed jobs run on the real model
        while len(replies) < sent and time.monotonic() < deadline:
            collect(100)
        collect(500)  # and nothing more comes
    finally:
        for sock in socks:
            sock.close()
        ctx.term()
    codes = Counter(m.body["code"] if m.type is protocol.MsgType.ERROR else m.type.value for m in replies)
    assert len(replies) == sent, (len(replies), sent, codes)
    assert {m.type for m in replies} <= {protocol.MsgType.ERROR, protocol.MsgType.REPLY, protocol.MsgType.RESULT}
    assert set(codes) <= {"BAD_REQUEST", "INVALID_AUDIO", "UNKNOWN_PROVIDER", "REPLY", "RESULT"}, codes
    assert codes["BAD_REQUEST"] > 1000 and codes["INVALID_AUDIO"] > 50 and codes["REPLY"] > 50, codes
    assert hub.proc.poll() is None
    with hub.client() as client:
        text = client.transcribe(DATA / "stella.wav", "whisper").text
        assert word_error_rate(reference("stella"), text) <= 0.10
        assert client.transcribe(TONE, "echo").text == echo_text(TONE)
        after = client.status()
    assert after["hub"]["malformed_messages"] > 1000 and "internal error" not in hub.log()
    assert [w["pid"] for w in after["providers"]["whisper"]["workers"]] == [
        w["pid"] for w in before["providers"]["whisper"]["workers"]
    ]


def test_audio_limits(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider()}, hub={"max_audio_seconds": 1})
    two_seconds = np.zeros(32000, dtype=np.float32) + 0.1
    for use_shm in (True, False):
        with hub.client(use_shm=use_shm) as client:
            with pytest.raises(InvalidAudio, match="over the limit of 1 s"):
                client.transcribe(two_seconds)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(hub.endpoint)
    try:  # beyond MAXMSGSIZE ZeroMQ drops the peer before a byte reaches the supervisor's memory
        sock.send_multipart(
            protocol.build(protocol.MsgType.TRANSCRIBE, "1", {"audio": {"samples": 1}}, b"\x00" * 3 * 2**20)
        )
        assert not sock.poll(1000)
    finally:
        sock.close()
        ctx.term()
    with hub.client() as client:
        assert client.transcribe(TONE[:8000]).text == echo_text(TONE[:8000])


def test_frontend_beyond_loopback_needs_keys_or_an_explicit_opt_out(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="can be reached from other machines"):
        parse_config({"hub": {"frontend": "tcp://0.0.0.0:5555"}, "providers": {"echo": {}}})
    assert parse_config({"hub": {"frontend": "tcp://0.0.0.0:5555", "allow_insecure": True}, "providers": {"echo": {}}})
    config = tmp_path / "exposed.yaml"
    config.write_text(yaml.safe_dump({"providers": {"echo": {}}}))
    out = subprocess.run(
        [sys.executable, "-m", "hub.supervisor", "--config", str(config), "--frontend", "tcp://*:5555"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "python -m hub.keys" in out.stderr


def test_curve_serves_allowed_keys_only(hub_factory, tmp_path: Path) -> None:
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("server", "alice", "mallory"):
        assert make_keys([str(keys), name]) == 0
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    hub = hub_factory(
        {"echo": echo_provider()},
        hub={"curve": {"server_secret_key": str(keys / "server.key_secret"), "allowed_clients": str(allowed)}},
        ready=False,
    )
    alice = CurveKeys.load(str(keys / "alice.key_secret"), str(keys / "server.key"))
    with HubClient(hub.endpoint, timeout=30, curve=alice) as client:
        client.wait_ready(30)
        assert client.transcribe(TONE).text == echo_text(TONE)
    mallory = CurveKeys.load(str(keys / "mallory.key_secret"), str(keys / "server.key"))
    with HubClient(hub.endpoint, timeout=20, curve=mallory) as client:
        started = time.monotonic()
        with pytest.raises(AuthFailed) as refused:
            client.transcribe(TONE)
        assert time.monotonic() - started < 5, "the refusal waited for the timeout instead of the handshake"
    message = str(refused.value)
    assert mallory.server.decode() in message and mallory.public.decode() in message and "allowed_clients" in message

    async def refused_async() -> str:
        async with AsyncHubClient(hub.endpoint, timeout=20, curve=mallory) as client:
            with pytest.raises(AuthFailed) as refused:
                await client.status()
            return str(refused.value)

    assert "allowed_clients" in asyncio.run(asyncio.wait_for(refused_async(), 10))
    for _ in range(3):  # the refusal ends the connection for good: a send after it must not wait forever
        with HubClient(hub.endpoint, timeout=20) as client:  # no keys at all
            with pytest.raises(AuthFailed, match="requires CURVE keys"):
                client.transcribe(TONE)
            with pytest.raises(AuthFailed, match="requires CURVE keys"):
                client.status()

    async def no_keys_async() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=20) as client:
            with pytest.raises(AuthFailed, match="requires CURVE keys"):
                await client.transcribe(TONE)

    asyncio.run(asyncio.wait_for(no_keys_async(), 10))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "hub.client",
            "--endpoint",
            hub.endpoint,
            "--client-key",
            str(keys / "alice.key_secret"),
            "--server-key",
            str(keys / "server.key"),
            "status",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0 and json.loads(cli.stdout)["hub"]["ready"]
    assert make_keys([str(keys), "alice"]) == 1  # never overwrites a secret


def test_a_frontend_beyond_loopback_is_allowed_with_curve(hub_factory, tmp_path: Path) -> None:
    """Bound on every address (tcp://0.0.0.0), allowed because CURVE is configured; reached here on loopback."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("server", "alice"):
        assert make_keys([str(keys), name]) == 0
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    port = free_port()
    curve = {"server_secret_key": str(keys / "server.key_secret"), "allowed_clients": str(allowed)}
    hub = hub_factory(
        {"echo": echo_provider()}, hub={"curve": curve}, ready=False, args=("--frontend", f"tcp://0.0.0.0:{port}")
    )
    alice = CurveKeys.load(str(keys / "alice.key_secret"), str(keys / "server.key"))
    with HubClient(f"tcp://127.0.0.1:{port}", timeout=30, curve=alice) as client:
        assert client.wait_ready(30)["hub"]["frontend"] == f"tcp://0.0.0.0:{port}"
        assert client.transcribe(TONE).text == echo_text(TONE)
    assert hub.proc.poll() is None


def test_keys_against_a_plain_hub_are_refused_with_advice(hub_factory, tmp_path: Path) -> None:
    """A client with CURVE keys meeting a hub without hub.curve: AUTH_FAILED saying so, at once, both clients."""
    for name in ("server", "alice"):
        assert make_keys([str(tmp_path), name]) == 0
    hub = hub_factory({"echo": echo_provider()})
    alice = CurveKeys.load(str(tmp_path / "alice.key_secret"), str(tmp_path / "server.key"))
    started = time.monotonic()
    with HubClient(hub.endpoint, timeout=20, curve=alice) as client:
        with pytest.raises(AuthFailed, match="does not use CURVE"):
            client.transcribe(TONE)

    async def refused_async() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=20, curve=alice) as client:
            with pytest.raises(AuthFailed, match="does not use CURVE"):
                await client.status()

    asyncio.run(asyncio.wait_for(refused_async(), 10))
    assert time.monotonic() - started < 10, "a refusal waited for the client's timeout"
    with HubClient(hub.endpoint, timeout=20) as client:
        assert client.transcribe(TONE).text == echo_text(TONE)  # the hub carries on


def test_a_refusal_before_the_monitor_would_have_been_attached_is_still_seen(
    hub_factory, tmp_path: Path, monkeypatch
) -> None:
    """Under load the client's thread may run again only after its first connection's handshake has failed.
    The monitor is attached before the socket connects, so that refusal is seen: AUTH_FAILED at once, not
    HUB_UNREACHABLE after the HELLO's wait. A slow ``get_monitor_socket`` stands in for the late thread."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    for name in ("server", "alice"):
        assert make_keys([str(keys), name]) == 0
    (allowed / "alice.key").write_bytes((keys / "alice.key").read_bytes())
    curve = {"server_secret_key": str(keys / "server.key_secret"), "allowed_clients": str(allowed)}
    hub = hub_factory({"echo": echo_provider()}, hub={"curve": curve}, ready=False)
    with HubClient(
        hub.endpoint, curve=CurveKeys.load(str(keys / "alice.key_secret"), str(keys / "server.key"))
    ) as alice:
        alice.wait_ready(30)
    attach = zmq.Socket.get_monitor_socket

    def late(sock: zmq.Socket, *args: object, **kwargs: object) -> zmq.Socket:
        time.sleep(1.0)  # the handshake (and its failure) completes on the I/O thread meanwhile, if connected
        return attach(sock, *args, **kwargs)

    monkeypatch.setattr(zmq.Socket, "get_monitor_socket", late)
    with HubClient(hub.endpoint, timeout=30) as client:  # no keys: a mechanism mismatch ends its only connection
        started = time.monotonic()
        with pytest.raises(AuthFailed, match="requires CURVE keys"):
            client.transcribe(TONE)
        assert time.monotonic() - started < 8, "the refusal was missed: the client waited for the HELLO's timeout"

    async def refused_async() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=30) as client:
            with pytest.raises(AuthFailed, match="requires CURVE keys"):
                await client.status()

    asyncio.run(asyncio.wait_for(refused_async(), 8))
