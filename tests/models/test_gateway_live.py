"""The live WebSocket ``/v1/stream`` against a real supervisor and gateway, with the ``websockets``
client: the real model's words for audio sent at 44.1 kHz in frames that split samples, the exact
length of resampled audio, every kind of bad input (each followed by a good stream), a client that
vanishes, a client that says nothing, and a client that sends far faster than real time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from hub.audio import to_pcm
from hub.errors import InvalidAudio
from hub.gateway.errors import ApiError, mapping
from hub.gateway.live import CONFIG_TIMEOUT_S, LiveAudio, parse_config
from tests.conftest import DATA, ROOT, reference, word_error_rate
from tests.gateway_support import Gateway, serving

pytestmark = pytest.mark.timeout(60)

# the echo provider names each half second by its RMS, so these levels read back as "a10 a20 ... a120"
LEVELS = [0.01 * (i + 1) for i in range(12)]
STEPS_TEXT = " ".join(f"a{round(level * 1000)}" for level in LEVELS)


def steps(rate: int) -> np.ndarray:
    return np.concatenate([np.full(rate // 2, level, dtype=np.float32) for level in LEVELS])


def upsample(pcm: np.ndarray, rate: int) -> np.ndarray:
    """A 16 kHz clip as a browser would capture it at ``rate`` (float32)."""
    import av

    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = 16000
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in (*resampler.resample(frame), *resampler.resample(None))])


def frames(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@dataclass
class Outcome:
    """What the server said on one connection: its events in order, and how it closed."""

    events: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    reason: str = ""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def transcript(self) -> dict[str, Any]:
        assert self.code == 1000, (self.code, self.reason, self.events[-3:])
        assert self.events[-1]["type"] == "transcript", self.events[-3:]
        return self.events[-1]


def ws_url(gw: Gateway, query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}/v1/stream{query}"


def read_all(ws: Any, timeout: float = 30.0) -> Outcome:
    outcome = Outcome()
    deadline = time.monotonic() + timeout
    try:
        while True:
            outcome.events.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    except ConnectionClosed:
        pass
    outcome.code, outcome.reason = ws.close_code, ws.close_reason or ""
    return outcome


def stream(
    gw: Gateway,
    first: str | bytes | dict[str, Any],
    audio: list[bytes | str] | None = None,
    close: bool = True,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> Outcome:
    """One connection: the first message, the frames, the close message; then everything the server says."""
    with connect(ws_url(gw, query), open_timeout=10, close_timeout=5, additional_headers=headers) as ws:
        try:
            ws.send(json.dumps(first) if isinstance(first, dict) else first)
            for frame in audio or []:
                ws.send(frame)
            if close:
                ws.send(json.dumps({"type": "close"}))
        except ConnectionClosed:
            pass  # the server refused early; what it said is read below
        return read_all(ws)


def assert_serves(gw: Gateway) -> None:
    """A good echo stream (48 kHz float32) completes with the right words and the exact length."""
    audio = steps(48000)
    config = {"model": "echo", "sample_rate": 48000, "encoding": "pcm_f32le"}
    outcome = stream(gw, config, frames(audio.astype("<f4").tobytes(), 8191))
    assert outcome.transcript["text"] == STEPS_TEXT
    assert outcome.transcript["duration"] == pytest.approx(audio.size / 48000, abs=1 / 16000)


def gauge(gw: Gateway, name: str) -> float:
    status, text = gw.get("/metrics")
    assert status == 200
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def echo_sessions(gw: Gateway) -> int:
    return int(gw.hub.status()["providers"]["echo"]["sessions"])


def assert_clean_log(log: str) -> None:
    """No traceback, and no asyncio task left pending on a session's queues and then destroyed."""
    for sign in ("Traceback", "Task was destroyed"):
        assert sign not in log, log[log.index(sign) - 2000 : log.index(sign) + 3000]


@pytest.fixture(scope="module", autouse=True)
def gateway_log_stays_clean(whisper_gateway: Gateway) -> Iterator[None]:
    yield
    assert_clean_log(whisper_gateway.hub.log())


# --- frames to PCM, without a server --------------------------------------------------------


@pytest.mark.parametrize("encoding, dtype", [("pcm_s16le", "<i2"), ("pcm_f32le", "<f4")])
@pytest.mark.parametrize("size", [1, 3, 1001])
def test_frames_may_split_samples(encoding: str, dtype: str, size: int) -> None:
    pcm = (np.sin(np.linspace(0, 200, 4800)) * (0.5 if dtype == "<f4" else 16000)).astype(dtype)
    data = pcm.tobytes()
    whole = LiveAudio(encoding, 48000)
    expected = np.concatenate([whole.feed(data), whole.finish()])
    split = LiveAudio(encoding, 48000)
    got = np.concatenate([*(split.feed(f) for f in frames(data, size)), split.finish()])
    assert got.size == expected.size == 1600 and np.array_equal(got, expected)
    cut = LiveAudio(encoding, 48000)
    cut.feed(data[:-1])
    with pytest.raises(InvalidAudio, match="ended inside a sample"):
        cut.finish()


@pytest.mark.parametrize(
    "text, param",
    [
        ("", None),
        ("[1, 2]", None),
        ('{"type": "close"}', "type"),
        ('{"model": 7}', "model"),
        ('{"sample_rate": 44100.5}', "sample_rate"),
        ('{"sample_rate": true}', "sample_rate"),
        ('{"encoding": "opus"}', "encoding"),
        ('{"timeout": 1}', "timeout"),
    ],
)
def test_bad_configs_name_the_field(text: str, param: str | None) -> None:
    with pytest.raises(ApiError) as refused:
        parse_config(text)
    assert refused.value.code == "BAD_REQUEST" and refused.value.param == param


def test_a_config_and_its_defaults() -> None:
    config = parse_config('{"model": "whisper-1", "language": "en", "sample_rate": 44100, "beam_size": 2}')
    assert (config.model, config.language, config.sample_rate, config.encoding) == (
        "whisper-1",
        "en",
        44100,
        "pcm_s16le",
    )
    assert config.options == {"beam_size": 2}
    assert parse_config('{"type": "config"}').sample_rate == 16000


# --- the real gateway ---------------------------------------------------------------------


def test_the_real_models_words_from_44k_frames_that_split_samples(whisper_gateway: Gateway) -> None:
    clip = to_pcm(DATA / "stella.wav")
    captured = upsample(clip, 44100)
    data = (captured * 32767).astype("<i2").tobytes()
    outcome = stream(whisper_gateway, {"model": "whisper-1", "sample_rate": 44100}, frames(data, 1001))
    transcript = outcome.transcript
    assert word_error_rate(reference("stella"), transcript["text"]) <= 0.2, transcript["text"]
    finals = outcome.of("final")
    assert finals and " ".join(f["text"] for f in finals) == transcript["text"]
    assert [s["text"] for s in transcript["segments"]] == [f["text"] for f in finals]
    assert all(0 <= f["start"] < f["end"] <= transcript["duration"] for f in finals)
    assert all(p["start"] <= p["end"] for p in outcome.of("partial"))
    # 44.1 kHz in, 16 kHz to the model: the same length as the clip, to the sample
    assert transcript["duration"] == pytest.approx(clip.size / 16000, abs=1 / 16000)
    assert transcript["language"] == "en"  # not asked for: the model's own, as HTTP answers it


def test_turn_detection_gives_the_speech_events_of_an_utterance(whisper_gateway: Gateway) -> None:
    """VAD asked for in the config: speech_started, speech_stopped, the utterance's finals, then its
    utterance event with all of its text; no partial after the speech stopped; a bad setting is refused."""
    silence = np.zeros(16000, dtype=np.float32)
    pcm = np.concatenate([silence, to_pcm(DATA / "coffee.wav"), silence, silence])
    config = {"model": "whisper-1", "turn_detection": {"vad": True, "endpoint_ms": 500}}
    outcome = stream(whisper_gateway, config, frames((pcm * 32767).astype("<i2").tobytes(), 3200))
    kinds = [e["type"] for e in outcome.events]
    assert kinds.count("speech_started") == kinds.count("speech_stopped") == kinds.count("utterance") == 1, kinds
    started, stopped, marker = kinds.index("speech_started"), kinds.index("speech_stopped"), kinds.index("utterance")
    assert started < stopped < marker and "partial" not in kinds[stopped:] and kinds[:started] == []
    utterance = outcome.events[marker]
    assert utterance["text"] == " ".join(f["text"] for f in outcome.of("final")) == outcome.transcript["text"]
    assert word_error_rate(reference("coffee"), utterance["text"]) <= 0.15, utterance["text"]
    assert (
        0.9 <= outcome.events[started]["at"] < utterance["at"] == outcome.events[stopped]["at"] <= pcm.size / 16000 - 1
    )
    refused = stream(whisper_gateway, {"model": "whisper-1", "turn_detection": {"vad": "yes"}}, [b"\0\0"])
    assert refused.of("error") and refused.of("error")[0]["code"] == "BAD_REQUEST", refused.events


def test_float32_at_48k_reaches_the_hub_exactly(whisper_gateway: Gateway) -> None:
    assert_serves(whisper_gateway)


@pytest.mark.parametrize(
    "first, code, close",
    [
        (b"\x00\xff" * 512, "UNSUPPORTED_DATA", 1003),  # binary garbage before the config
        ("this is not json {", "BAD_REQUEST", 1008),
        ({"model": "no-such-model"}, "UNKNOWN_PROVIDER", 1008),
        ({"model": "echo", "encoding": "mp3"}, "BAD_REQUEST", 1008),
        ({"model": "echo", "sample_rate": 100}, "BAD_REQUEST", 1008),
        ({"model": "echo", "beam_size": 2}, "BAD_REQUEST", 1008),  # the hub checks options per model
        ({"model": "whisper-1", "language": "fr"}, "BAD_REQUEST", 1008),  # the worker, its model's languages
    ],
)
def test_a_bad_first_message_is_refused_and_the_gateway_serves_on(
    whisper_gateway: Gateway, first: Any, code: str, close: int
) -> None:
    outcome = stream(whisper_gateway, first, [b"\x01\x02" * 100], close=False)
    assert [e["type"] for e in outcome.events] == ["error"] and outcome.events[0]["code"] == code
    assert outcome.code == close and outcome.reason and outcome.reason in outcome.events[0]["message"]
    assert_serves(whisper_gateway)


@pytest.mark.parametrize(
    "encoding, audio, code, close",
    [
        ("pcm_s16le", [b"\x00\x01" * 800, "not the close message"], "BAD_REQUEST", 1008),
        ("pcm_s16le", [b"\x00\x01" * 800, b"\x00"], "INVALID_AUDIO", 1007),  # ends inside a sample
        ("pcm_f32le", [np.array([0.1, np.nan, 0.2], dtype="<f4").tobytes()], "INVALID_AUDIO", 1007),
    ],
)
def test_bad_input_mid_stream_ends_it_and_frees_the_session(
    whisper_gateway: Gateway, encoding: str, audio: list[Any], code: str, close: int
) -> None:
    outcome = stream(whisper_gateway, {"model": "echo", "encoding": encoding}, audio)
    assert outcome.of("error") and outcome.of("error")[0]["code"] == code and outcome.code == close
    wait_until(lambda: echo_sessions(whisper_gateway) == 0, 10, "the hub session is closed")
    assert_serves(whisper_gateway)  # the echo pool allows one session: a leaked one would refuse this


config_values = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 400000), st.text(max_size=12), st.floats(allow_nan=True)
)
first_messages = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=60),
    st.fixed_dictionaries(
        {"model": st.sampled_from(["echo", "Echo", "", "whisper-1x"])},
        optional={key: config_values for key in ("type", "language", "sample_rate", "encoding", "segments", "x")},
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    first=first_messages,
    audio=st.lists(st.one_of(st.binary(max_size=700), st.text(max_size=20)), max_size=4),
)
def test_random_input_gets_a_transcript_or_a_typed_error(
    whisper_gateway: Gateway, first: Any, audio: list[Any]
) -> None:
    outcome = stream(whisper_gateway, first, audio)
    if outcome.code == 1000:
        assert outcome.transcript["text"] is not None
        return
    errors = outcome.of("error")
    assert errors and outcome.events[-1] is errors[0], outcome
    assert outcome.code == mapping(errors[0]["code"]).close != 1011, outcome  # the client's fault, never the server's
    wait_until(lambda: echo_sessions(whisper_gateway) == 0, 10, "the hub session is closed")


def test_a_busy_pool_says_try_again_later(whisper_gateway: Gateway) -> None:
    with connect(ws_url(whisper_gateway), open_timeout=10) as first:
        first.send(json.dumps({"model": "echo", "sample_rate": 48000, "encoding": "pcm_f32le"}))
        first.send(steps(48000).astype("<f4").tobytes())
        wait_until(lambda: echo_sessions(whisper_gateway) == 1, 10, "the first session is open")
        second = stream(whisper_gateway, {"model": "echo"}, [b"\x00\x00" * 1600])
        assert second.events[0]["code"] == "POOL_BUSY" and second.code == 1013  # try again later
        first.send(json.dumps({"type": "close"}))
        assert read_all(first).transcript["text"] == STEPS_TEXT


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("keyed")
    (tmp / "keys").write_text("sesame\n")
    echo = {"type": "echo", "pool": {"min_size": 1, "max_size": 1, "max_sessions": 1, "session_idle_timeout": 1.0}}
    with serving(tmp, {"echo": echo}, api_keys_file=str(tmp / "keys"), wyoming_port=0) as gw:
        yield gw
        assert_clean_log(gw.hub.log())


def test_api_keys_by_header_or_query_parameter(keyed_gateway: Gateway) -> None:
    config = {"model": "echo", "sample_rate": 48000, "encoding": "pcm_f32le"}
    audio = [steps(48000).astype("<f4").tobytes()]
    for query, headers in (("", None), ("?api_key=wrong", None), ("", {"Authorization": "Bearer wrong"})):
        refused = stream(keyed_gateway, config, audio, query=query, headers=headers)
        assert refused.events[0]["code"] == "UNAUTHORIZED" and refused.code == 1008, refused
    assert stream(keyed_gateway, config, audio, query="?api_key=sesame").transcript["text"] == STEPS_TEXT
    assert (
        stream(keyed_gateway, config, audio, headers={"Authorization": "Bearer sesame"}).transcript["text"]
        == STEPS_TEXT
    )


def test_a_session_the_hub_ends_for_silence_still_gets_its_transcript(keyed_gateway: Gateway) -> None:
    with connect(ws_url(keyed_gateway, "?api_key=sesame"), open_timeout=10) as ws:
        ws.send(json.dumps({"model": "echo", "sample_rate": 48000, "encoding": "pcm_f32le"}))
        ws.send(np.concatenate([steps(48000), np.zeros(12000, np.float32)]).astype("<f4").tobytes())
        outcome = read_all(ws, timeout=20)  # then nothing more: after 1 s the hub closes the session
    transcript = outcome.transcript
    assert transcript["text"] == STEPS_TEXT
    # without the client's close, the resampler's last millisecond never reaches the hub
    assert transcript["duration"] == pytest.approx(6.25 - 0.001, abs=1 / 16000)
    assert transcript["closed_reason"].startswith("no audio for") and outcome.reason == transcript["closed_reason"]


VANISHING_CLIENT = """
import json, sys, time
from websockets.sync.client import connect
ws = connect(sys.argv[1], open_timeout=10)
ws.send(json.dumps({"model": "echo"}))
ws.send(b"\\x00\\x10" * 16000)
print("streaming", flush=True)
time.sleep(60)
"""


def test_a_client_that_vanishes_mid_stream_frees_its_session(whisper_gateway: Gateway) -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, ws_url(whisper_gateway)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdout.readline() == "streaming\n"
        wait_until(lambda: echo_sessions(whisper_gateway) == 1, 10, "its session is open")
        assert gauge(whisper_gateway, "asr_hub_gateway_websockets_open") == 1
    finally:
        client.kill()  # no close frame: the TCP connection just ends
        client.wait(10)
    wait_until(lambda: echo_sessions(whisper_gateway) == 0, 10, "the hub session is closed")
    wait_until(lambda: gauge(whisper_gateway, "asr_hub_gateway_websockets_open") == 0, 10, "the socket is counted out")
    assert_serves(whisper_gateway)


def test_a_client_that_sends_nothing_is_closed_and_blocks_nobody(whisper_gateway: Gateway) -> None:
    with connect(ws_url(whisper_gateway), open_timeout=10) as idle:
        opened = time.monotonic()
        assert_serves(whisper_gateway)  # while the silent one waits
        outcome = read_all(idle, timeout=CONFIG_TIMEOUT_S + 10)
    waited = time.monotonic() - opened
    assert len(outcome.events) == 1 and outcome.events[0]["code"] == "BAD_REQUEST"
    assert "no config message" in outcome.reason and outcome.code == 1008
    assert CONFIG_TIMEOUT_S - 0.5 <= waited <= CONFIG_TIMEOUT_S + 5
    assert_serves(whisper_gateway)


def gateway_process(gw: Gateway) -> psutil.Process:
    children = psutil.Process(gw.hub.proc.pid).children(recursive=True)
    return next(p for p in children if "hub.gateway" in " ".join(p.cmdline()))


@pytest.mark.timeout(120)
def test_a_flood_faster_than_real_time_is_held_back_not_buffered(whisper_gateway: Gateway) -> None:
    """Ten minutes of 48 kHz float32 (115 MB) as fast as the socket takes it, to a session whose worker
    is slowed down: the hub's ring pushes back, the gateway stops reading, and its memory stays flat
    while a second client is served in the meantime. The client offers permessage-deflate, as browsers
    do: such steady audio compresses a thousandfold, so one read from the socket could hold a hundred
    frames if the server accepted the extension."""
    gateway = gateway_process(whisper_gateway)
    assert_serves(whisper_gateway)  # the same path once, so that what it loads on first use is in the baseline
    baseline = gateway.memory_info().rss
    peak = baseline
    seconds = 600
    block = steps(48000).astype("<f4").tobytes()  # 6 s
    done = threading.Event()
    result: list[Outcome] = []

    def flood() -> None:
        config = {"model": "echo", "sample_rate": 48000, "encoding": "pcm_f32le", "sleep": 0.05}
        result.append(stream(whisper_gateway, config, [block] * (seconds // 6)))
        done.set()

    sender = threading.Thread(target=flood)
    sender.start()
    other = None
    while not done.wait(0.05):
        peak = max(peak, gateway.memory_info().rss)
        if other is None and echo_sessions(whisper_gateway) == 1:  # the flood is on: serve someone else
            clip = (to_pcm(DATA / "hello.wav") * 32767).astype("<i2").tobytes()
            other = stream(whisper_gateway, {"model": "whisper", "language": "en"}, frames(clip, 3200))
    sender.join(10)
    assert other is not None and word_error_rate(reference("hello"), other.transcript["text"]) <= 0.5
    assert result[0].transcript["duration"] == pytest.approx(seconds, abs=1 / 16000)
    assert peak - baseline < 32 * 2**20, f"the gateway grew by {(peak - baseline) / 2**20:.0f} MiB"
