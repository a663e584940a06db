"""Hostile HTTP input against a real gateway: whatever arrives, the answer is a 4xx in OpenAI's error shape
(never a 500), and the gateway and the hub keep serving."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DATA
from tests.gateway_support import Gateway, serving

pytestmark = pytest.mark.timeout(300)
WAV = (DATA / "hello.wav").read_bytes()


@pytest.fixture(scope="module")
def echo_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    echo = {"echo": {"type": "echo", "pool": {"min_size": 1, "max_size": 2}}}
    with serving(tmp_path_factory.mktemp("fuzz"), echo, max_upload_mb=1) as gw:
        yield gw


def check_answer(reply: httpx.Response) -> None:
    """A transcript (some fuzzed bytes are valid audio: a cut WAV header still decodes) or a 4xx with an error."""
    if reply.status_code == 200:
        assert "echo" in reply.text, reply.text  # json, text, srt or vtt: all carry the echo's answer
        return
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text[:500])
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error


fields = st.dictionaries(
    st.sampled_from(
        ["model", "language", "prompt", "response_format", "temperature", "stream", "timestamp_granularities[]", "x"]
    ),
    st.text(max_size=40),
    max_size=6,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=fields, audio=st.one_of(st.binary(max_size=2000), st.just(WAV[:100]), st.just(WAV[44:2000])))
def test_random_forms_get_4xx(echo_gateway: Gateway, data: dict[str, str], audio: bytes) -> None:
    with httpx.Client(base_url=echo_gateway.url, timeout=30) as client:
        reply = client.post("/v1/audio/transcriptions", data=data, files={"file": ("f.bin", audio)})
    check_answer(reply)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=4000),
    content_type=st.sampled_from(
        ["multipart/form-data; boundary=X", "multipart/form-data", "application/json", "text/plain", ""]
    ),
)
def test_random_bodies_get_4xx(echo_gateway: Gateway, body: bytes, content_type: str) -> None:
    with httpx.Client(base_url=echo_gateway.url, timeout=30) as client:
        reply = client.post("/v1/audio/transcriptions", content=body, headers={"content-type": content_type})
    check_answer(reply)


def wyoming_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes to the Wyoming port, then read what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


wyoming_lines = st.lists(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda kind, data: (json.dumps({"type": kind, "data": data}) + "\n").encode(),
            st.sampled_from(["audio-chunk", "audio-start", "audio-stop", "transcribe", "describe", "ping", "x"]),
            st.dictionaries(
                st.sampled_from(["rate", "width", "channels", "name", "language"]),
                st.integers(-5, 70000) | st.text(max_size=8),
                max_size=3,
            ),
        ),
    ),
    max_size=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=wyoming_lines)
def test_random_wyoming_events_get_events_or_an_error_never_a_crash(echo_gateway: Gateway, lines: list[bytes]) -> None:
    received = wyoming_exchange(echo_gateway.wyoming_port, b"".join(lines))
    kinds = event_types(received)
    assert set(kinds) <= {
        "info",
        "pong",
        "error",
        "transcript",
        "transcript-start",
        "transcript-chunk",
        "transcript-stop",
    }, kinds
    assert "error" not in kinds[:-1], kinds  # an error is the last word on its connection


def event_types(stream: bytes) -> list[str]:
    """The types of the Wyoming events in ``stream``: a JSON header line, then its data and payload bytes."""
    kinds = []
    while stream:
        line, _, stream = stream.partition(b"\n")
        header = json.loads(line)
        kinds.append(header["type"])
        stream = stream[header.get("data_length") or 0 :][header.get("payload_length") or 0 :]
    return kinds


def test_still_serving_after_the_fuzz(echo_gateway: Gateway) -> None:
    assert event_types(wyoming_exchange(echo_gateway.wyoming_port, b'{"type": "describe"}\n')) == ["info"]
    with httpx.Client(base_url=echo_gateway.url, timeout=30) as client:
        reply = client.post("/v1/audio/transcriptions", data={"model": "echo"}, files={"file": ("h.wav", WAV)})
    assert reply.status_code == 200 and reply.json()["text"].startswith("echo"), reply.text
    assert echo_gateway.hub.status()["hub"]["ready"]
