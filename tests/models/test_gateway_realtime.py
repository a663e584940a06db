"""OpenAI Realtime transcription (``/v1/realtime``) against a real supervisor and gateway: the ``openai`` SDK's
realtime client with the real tiny.en model and manual commits, the beta dialect and every kind of bad
event (each answered with an ``error`` while the socket stays open), API keys by header and by
subprotocol, the gateway's connection limit, a busy pool, and turns made by the hub's VAD (where the
hub has one)."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import pytest
from openai import OpenAI
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from hub.audio import to_pcm
from hub.wer import word_error_rate
from tests.conftest import DATA, reference
from tests.gateway_support import Gateway, serving
from tests.models.test_gateway_live import STEPS_TEXT, assert_clean_log, echo_sessions, steps, upsample, wait_until

pytestmark = pytest.mark.timeout(120)

RATE = 24000
KEY = "sesame"
PREFIX = "conversation.item.input_audio_transcription"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("realtime")
    (tmp / "keys").write_text(f"{KEY}\n")
    whisper: dict[str, Any] = {"type": "whisper", "model": "tiny.en", "pool": {"min_size": 1, "max_size": 2}}
    echo = {"type": "echo", "pool": {"min_size": 1, "max_size": 1, "max_sessions": 1}}
    quiet = {"type": "echo", "pool": {"min_size": 1, "max_size": 1, "max_sessions": 1, "session_idle_timeout": 1.0}}
    providers = {"whisper": whisper, "echo": echo, "quiet": quiet}
    with serving(tmp, providers, api_keys_file=str(tmp / "keys"), max_concurrent_requests=3, wyoming_port=0) as served:
        yield served
        assert_clean_log(served.hub.log())


def pcm24(name: str) -> bytes:
    """A test clip as the Realtime API wants it: pcm16 at 24 kHz."""
    return (np.clip(upsample(to_pcm(str(DATA / f"{name}.wav")), RATE), -1, 1) * 32767).astype("<i2").tobytes()


def chunks(pcm: bytes, seconds: float = 0.1) -> list[str]:
    size = int(RATE * seconds) * 2
    return [base64.b64encode(pcm[i : i + size]).decode() for i in range(0, len(pcm), size)]


def open_socket(
    gw: Gateway,
    query: str = "?intent=transcription",
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
) -> ClientConnection:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return connect(
        f"ws://127.0.0.1:{gw.port}/v1/realtime{query}",
        additional_headers={**auth, **(headers or {})},
        subprotocols=subprotocols,  # type: ignore[arg-type]
        open_timeout=10,
        close_timeout=5,
        max_size=None,
    )


def recv(ws: ClientConnection, timeout: float = 60.0) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def until(ws: ClientConnection, kind: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Events up to and including the ``count``-th of ``kind``."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while sum(e["type"] == kind for e in events) < count:
        events.append(recv(ws, max(0.1, deadline - time.monotonic())))
    return events


def send(ws: ClientConnection, body: dict[str, Any]) -> None:
    ws.send(json.dumps(body))


def append(ws: ClientConnection, pcm: bytes) -> None:
    for chunk in chunks(pcm):
        send(ws, {"type": "input_audio_buffer.append", "audio": chunk})


def refused(ws: ClientConnection) -> tuple[dict[str, Any], int | None]:
    """The error a refused connection gets, and the close code that follows it."""
    error = recv(ws, 10)
    with pytest.raises(ConnectionClosed):
        recv(ws, 10)
    return error, ws.close_code


def items(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per item: its deltas joined and its completed transcript."""
    out: dict[str, dict[str, Any]] = {}
    for event in events:
        if event["type"].startswith(PREFIX) or event["type"] == "input_audio_buffer.committed":
            entry = out.setdefault(event["item_id"], {"deltas": "", "transcript": None})
            entry["deltas"] += event.get("delta") or ""
            if event["type"].endswith(".completed"):
                entry["transcript"] = event["transcript"]
    return out


def open_websockets(gw: Gateway) -> float:
    _, body = gw.get("/metrics")
    return float(re.search(r"^asr_hub_gateway_websockets_open (\S+)$", body, re.M).group(1))  # type: ignore[union-attr]


def test_openai_sdk_transcribes_committed_turns_with_the_real_model(gw: Gateway) -> None:
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0)
    with client.realtime.connect(extra_query={"intent": "transcription"}, max_retries=0) as conn:
        created = conn.recv()
        assert created.type == "session.created"
        conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": RATE},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": None,
                    }
                },
            }
        )
        updated = conn.recv()
        assert updated.type == "session.updated", updated
        assert updated.session.audio.input.turn_detection is None  # type: ignore[union-attr]
        for name in ("hello", "weather"):
            for chunk in chunks(pcm24(name)):
                conn.input_audio_buffer.append(audio=chunk)
            conn.input_audio_buffer.commit()
        events: list[Any] = []
        while sum(e.type == f"{PREFIX}.completed" for e in events) < 2:
            events.append(conn.recv())
    assert not [e for e in events if e.type == "error"], events
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    completed = [e for e in events if e.type == f"{PREFIX}.completed"]
    assert [c.item_id for c in committed] == [c.item_id for c in completed]  # one item per commit, in order
    assert committed[0].previous_item_id is None and committed[1].previous_item_id == committed[0].item_id
    for event, name in zip(completed, ("hello", "weather"), strict=True):
        assert word_error_rate(reference(name), event.transcript) <= 0.2, (name, event.transcript)
        deltas = "".join(e.delta or "" for e in events if e.type == f"{PREFIX}.delta" and e.item_id == event.item_id)
        assert deltas == event.transcript  # the deltas add up to the transcript
        assert event.usage.seconds == pytest.approx(len(pcm24(name)) / 2 / RATE, abs=0.11)  # type: ignore[union-attr]


def test_beta_dialect_and_every_bad_event_leave_the_socket_open(gw: Gateway) -> None:
    """``?model=echo`` picks the model; the beta header picks the beta events. Each mistake gets an ``error``
    naming it, and the session then transcribes as if nothing happened."""
    with open_socket(gw, "?model=echo", headers={"OpenAI-Beta": "realtime=v1"}) as ws:
        created = recv(ws)
        assert created["type"] == "transcription_session.created"
        assert created["session"]["input_audio_transcription"]["model"] == "echo"
        mistakes: list[tuple[str | bytes | dict[str, Any], str, str | None]] = [
            ("{not json", "invalid_json", None),
            (b"\x00\x01", "invalid_event", None),
            ({"type": "response.create", "event_id": "r1"}, "unknown_event_type", "type"),
            ({"type": "input_audio_buffer.append", "audio": "***"}, "invalid_base64", "audio"),
            (
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"odd").decode()},
                "invalid_value",
                "audio",
            ),
            (
                {"type": "transcription_session.update", "session": {"input_audio_format": "g711_alaw"}},
                "unsupported_value",
                "session.input_audio_format",
            ),
            (
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                    },
                },
                "invalid_value",
                "session.audio.input.format.rate",
            ),
            ({"type": "input_audio_buffer.commit", "event_id": "c1"}, "input_audio_buffer_commit_empty", None),
        ]
        for body, code, param in mistakes:
            ws.send(json.dumps(body) if isinstance(body, dict) else body)
            error = recv(ws)
            assert error["type"] == "error" and error["event_id"], error
            assert (error["error"]["code"], error["error"]["param"]) == (code, param), error
            assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
            if isinstance(body, dict) and "event_id" in body:
                assert error["error"]["event_id"] == body["event_id"]
        send(ws, {"type": "transcription_session.update", "session": {"turn_detection": None}})
        updated = recv(ws)
        assert updated["type"] == "transcription_session.updated" and updated["session"]["turn_detection"] is None
        append(ws, (steps(RATE) * 32767).astype("<i2").tobytes())
        send(ws, {"type": "input_audio_buffer.commit"})
        events = until(ws, f"{PREFIX}.completed")
    assert not [e for e in events if e["type"] == "error"], events
    (item,) = items(events).values()
    assert item["transcript"] == item["deltas"] == STEPS_TEXT, events


def test_api_keys_by_header_or_subprotocol(gw: Gateway) -> None:
    for key in (None, "wrong"):
        with open_socket(gw, key=key) as ws:
            error, code = refused(ws)
        assert (error["error"]["code"], error["error"]["type"], code) == (
            "unauthorized",
            "invalid_request_error",
            1008,
        ), error
    # a browser cannot set headers: it offers the key as a subprotocol, and the server picks "realtime"
    with open_socket(gw, key=None, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        assert ws.subprotocol == "realtime"
        assert recv(ws)["type"] == "session.created"
    with open_socket(gw) as ws:
        assert recv(ws)["type"] == "session.created"


def test_only_transcription_sessions(gw: Gateway) -> None:
    with open_socket(gw, "?intent=conversation") as ws:
        error, code = refused(ws)
    assert (error["error"]["code"], error["error"]["param"], code) == ("bad_request", "intent", 1008), error


def test_too_many_connections_are_refused_with_try_again_later(gw: Gateway) -> None:
    wait_until(lambda: open_websockets(gw) == 0, 10, "earlier connections are gone")
    with ExitStack() as stack:
        for _ in range(3):  # gateway.max_concurrent_requests
            assert recv(stack.enter_context(open_socket(gw)))["type"] == "session.created"
        with open_socket(gw) as ws:
            error, code = refused(ws)
    assert (error["error"]["code"], error["error"]["type"], code) == ("too_many_requests", "rate_limit_error", 1013)


def test_a_busy_pool_is_an_error_and_the_socket_stays_open(gw: Gateway) -> None:
    """echo serves one session at a time: a second connection's audio is refused (pool_busy) until the first
    commits; then the same socket goes on. A client that leaves has its hub session closed."""
    audio = (steps(RATE) * 32767).astype("<i2").tobytes()
    manual = {
        "type": "session.update",
        "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
    }
    with open_socket(gw, "?model=echo") as first, open_socket(gw, "?model=echo") as second:
        for ws in (first, second):
            recv(ws)
            send(ws, manual)
            assert recv(ws)["type"] == "session.updated"
        append(first, audio[:RATE])
        wait_until(lambda: echo_sessions(gw) == 1, 10, "the first connection's hub session is open")
        send(second, {"type": "input_audio_buffer.append", "audio": chunks(audio)[0], "event_id": "a1"})
        error = recv(second)
        assert (error["error"]["code"], error["error"]["type"], error["error"]["event_id"]) == (
            "pool_busy",
            "rate_limit_error",
            "a1",
        )
        append(first, audio[RATE:])
        send(first, {"type": "input_audio_buffer.commit"})
        assert list(items(until(first, f"{PREFIX}.completed")).values())[0]["transcript"] == STEPS_TEXT
        wait_until(lambda: echo_sessions(gw) == 0, 10, "the commit closed the first hub session")
        append(second, audio)
        send(second, {"type": "input_audio_buffer.commit"})
        assert list(items(until(second, f"{PREFIX}.completed")).values())[0]["transcript"] == STEPS_TEXT
        append(first, audio)  # then the first client leaves without a commit
        wait_until(lambda: echo_sessions(gw) == 1, 10, "the first connection's second hub session is open")
    wait_until(lambda: echo_sessions(gw) == 0, 10, "a client that left has its hub session closed")


def test_a_session_the_hub_closes_for_silence_completes_and_the_next_audio_opens_another(gw: Gateway) -> None:
    """``quiet`` closes a session after 1 s without audio: the item it heard completes without a commit, and
    the connection goes on with a new hub session for the next audio."""
    audio = (steps(RATE) * 32767).astype("<i2").tobytes()
    with open_socket(gw, "?model=quiet") as ws:
        recv(ws)
        send(
            ws,
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
            },
        )
        assert recv(ws)["type"] == "session.updated"
        # 50 ms of silence after the steps: the resampler holds back its last samples until a close flushes it,
        # and the hub's own close cannot
        append(ws, audio + bytes(RATE // 10))
        first = until(ws, f"{PREFIX}.completed")  # no commit: the hub's idle timeout ends the session
        append(ws, audio)
        send(ws, {"type": "input_audio_buffer.commit"})
        second = until(ws, f"{PREFIX}.completed")
    (one,) = items(first).items()
    (two,) = items(second).items()
    assert one[1]["transcript"] == two[1]["transcript"] == STEPS_TEXT
    committed = [e for e in second if e["type"] == "input_audio_buffer.committed"]
    assert committed[0]["previous_item_id"] == one[0] != two[0]


def test_server_vad_turns_without_commits(gw: Gateway) -> None:
    """Two utterances, each followed by silence: the hub's VAD (turned on by the session's server_vad, the
    provider's ``stream.vad`` is off) starts, stops and commits each item, and completes it, without a commit
    from the client."""
    silence = bytes(2 * RATE * 2)  # 2 s
    with open_socket(gw) as ws:
        recv(ws)
        send(
            ws,
            {
                "type": "session.update",
                "session": {
                    "type": "transcription",
                    "audio": {
                        "input": {
                            "transcription": {"language": "en"},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                        }
                    },
                },
            },
        )
        assert recv(ws)["type"] == "session.updated"
        started = time.monotonic()  # sent as it would be spoken: 100 ms every 100 ms
        for i, chunk in enumerate(chunks(silence + pcm24("hello") + silence + pcm24("weather") + silence)):
            time.sleep(max(0.0, started + i * 0.1 - time.monotonic()))
            send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        events = until(ws, f"{PREFIX}.completed", count=2, timeout=60)
    assert not [e for e in events if e["type"] == "error"], events
    kinds = [e["type"] for e in events]
    assert (
        kinds.count("input_audio_buffer.speech_started") == 2 and kinds.count("input_audio_buffer.speech_stopped") == 2
    ), events
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    assert 1500 <= starts[0] <= 2500, starts  # the first speech begins after 2 s of silence
    assert kinds.count("input_audio_buffer.committed") == 2, events
    transcripts = [entry["transcript"] for entry in items(events).values()]
    # each item has its own utterance's words, unless the worker fell behind and decoded both as one (on a
    # loaded machine it does): then the first has all of them and the second none, which the unit tests cover
    assert len(transcripts) == 2 and transcripts[0].startswith("Hello"), transcripts
    spoken = f"{reference('hello')} {reference('weather')}"
    assert word_error_rate(spoken, " ".join(transcripts)) <= 0.2, transcripts
