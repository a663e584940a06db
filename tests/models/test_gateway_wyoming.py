"""The Wyoming server, driven by the ``wyoming`` package's own TCP client the way Home Assistant drives it:
``describe`` on one connection; ``transcribe``, ``audio-start``, 16 kHz 16-bit mono ``audio-chunk``s of 1024
samples and ``audio-stop`` on another, then read until ``transcript``. The server runs in the real gateway
child of a real supervisor with the bundled tiny.en, or, where a test needs a short idle timeout, a small
audio bound or to stop the server under a live request, in this process against that same hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import av
import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info

from hub.config import GatewaySection
from hub.gateway import wyoming_asr
from hub.gateway.state import Gateway, Settings
from tests.conftest import CLIPS, DATA, free_port, reference, word_error_rate
from tests.gateway_support import Gateway as GatewayProcess
from workers.echo import echo_text

TINY_EN_MAX_WER = 0.15  # tiny.en gets the committed clips right; allow a word in seven
SAMPLES_PER_CHUNK = 1024  # what Home Assistant's pipeline sends
STEP_S = 30.0  # the longest any single exchange may take on a loaded 2-core machine


def clip(name: str) -> bytes:
    with wave.open(str(DATA / f"{name}.wav")) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (16000, 2, 1)
        return wav.readframes(wav.getnframes())


def run(coro: Awaitable[Any], timeout: float = 90.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[AsyncTcpClient]:
    client = AsyncTcpClient("127.0.0.1", port, connect_timeout=5, read_timeout=STEP_S)
    async with client:
        yield client


async def send_audio(
    client: AsyncTcpClient, pcm: bytes, rate: int = 16000, width: int = 2, channels: int = 1, **transcribe: Any
) -> None:
    """Home Assistant's request: transcribe, audio-start, chunks of 1024 frames, audio-stop."""
    await client.write_event(Transcribe(**transcribe).event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = SAMPLES_PER_CHUNK * width * channels
    for start in range(0, len(pcm), step):
        await client.write_event(
            AudioChunk(rate=rate, width=width, channels=channels, audio=pcm[start : start + step]).event()
        )
    await client.write_event(AudioStop().event())


async def read_until(client: AsyncTcpClient, *types: str) -> list[Event | None]:
    """Every event up to and including the first of ``types`` (or an error, or the close: None)."""
    events: list[Event | None] = []
    while True:
        try:
            event = await client.read_event()
        except ConnectionResetError:  # closed with our data unread: a reset instead of an orderly close
            event = None
        events.append(event)
        if event is None or event.type in (*types, "error"):
            return events


async def transcribe(port: int, pcm: bytes, **kwargs: Any) -> list[Event | None]:
    """One request on a fresh connection: every event the server sent up to transcript-stop."""
    async with connect(port) as client:
        await send_audio(client, pcm, **kwargs)
        return await read_until(client, "transcript-stop")


def transcript_text(events: list[Event | None]) -> str:
    found = [Transcript.from_event(e).text for e in events if e is not None and Transcript.is_type(e.type)]
    assert len(found) == 1, events
    return found[0]


async def expect_error_then_close(client: AsyncTcpClient, code: str) -> Error:
    event = await client.read_event()
    assert event is not None and Error.is_type(event.type), event
    error = Error.from_event(event)
    assert error.code == code, error
    assert await client.read_event() is None  # the server closed the connection
    return error


async def still_serves(port: int) -> None:
    """A good request on a new connection after the bad one."""
    assert transcript_text(await transcribe(port, clip("hello"))) == "Hello world."


def wyoming_gauge(gateway: GatewayProcess) -> float:
    status, body = gateway.get("/metrics")
    assert status == 200
    match = re.search(r"^asr_hub_gateway_wyoming_connections_open (\S+)$", body, re.M)
    assert match, body
    return float(match.group(1))


async def wait_for_value(read: Callable[[], float], want: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (value := read()) != want:
        assert time.monotonic() < deadline, f"value {value}, expected {want}"
        await asyncio.sleep(0.05)


# --- the pure parts ---------------------------------------------------------------------------------


def test_languages_follow_the_provider_type_and_model() -> None:
    def languages(kind: str, model: str) -> list[str]:
        return wyoming_asr.model_languages({"type": kind, "model": model})

    assert languages("whisper", "tiny.en") == languages("whisper", "/models/distil-large-v3") == ["en"]
    assert {"en", "de", "zh", "yue"} <= set(languages("whisper", "large-v3")) and len(
        languages("whisper", "small")
    ) == 100
    assert languages("funasr", "/models/SenseVoiceSmall") == ["zh", "en", "yue", "ja", "ko"]
    assert languages("funasr", "paraformer-en") == ["en"]
    assert languages("funasr", "paraformer-zh") == ["zh"]
    assert languages("echo", "") == []


def test_integer_pcm_is_mixed_down_to_float() -> None:
    u8 = wyoming_asr.PcmFormat(16000, 1, 1)
    assert wyoming_asr.mono_float(bytes([128, 255, 0]), u8).tolist() == [0.0, 127 / 128, -1.0]
    s16_stereo = wyoming_asr.PcmFormat(16000, 2, 2)
    pcm = np.array([16384, -16384, 16384, 16384], dtype="<i2").tobytes()
    assert wyoming_asr.mono_float(pcm, s16_stereo).tolist() == [0.0, 0.5]
    s32 = wyoming_asr.PcmFormat(16000, 4, 1)
    assert wyoming_asr.mono_float(np.array([-(2**31)], dtype="<i4").tobytes(), s32).tolist() == [-1.0]


# --- against the supervised gateway ------------------------------------------------------------------


def test_describe_lists_the_providers(whisper_gateway: GatewayProcess) -> None:
    async def main() -> Info:
        async with connect(whisper_gateway.wyoming_port) as client:
            await client.write_event(Describe().event())
            event = await client.read_event()
            assert event is not None and Info.is_type(event.type), event
            return Info.from_event(event)

    info = run(main())
    assert [program.name for program in info.asr] == ["asr-hub"]
    program = info.asr[0]
    assert program.installed and program.version and program.supports_transcript_streaming
    models = {model.name: model for model in program.models}
    assert list(models) == ["whisper", "echo"]  # the default provider first
    assert models["whisper"].languages == ["en"]  # tiny.en
    assert models["whisper"].installed and models["whisper"].description == "whisper tiny.en"
    assert models["echo"].languages == []


def test_home_assistant_request_gets_the_words_of_each_clip(whisper_gateway: GatewayProcess) -> None:
    async def main() -> dict[str, str]:
        return {
            name: transcript_text(await transcribe(whisper_gateway.wyoming_port, clip(name), language="en"))
            for name in CLIPS
        }

    for name, text in run(main()).items():
        assert word_error_rate(reference(name), text) <= TINY_EN_MAX_WER, (name, text)


def test_streamed_transcript_events_come_in_order_and_join_to_the_text(whisper_gateway: GatewayProcess) -> None:
    events = run(transcribe(whisper_gateway.wyoming_port, clip("stella"), language="en"))
    types = [event.type for event in events]
    assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"], types
    assert set(types[1:-2]) == {"transcript-chunk"}, types
    chunks = [TranscriptChunk.from_event(event).text for event in events if TranscriptChunk.is_type(event.type)]
    assert "".join(chunks) == transcript_text(events)
    assert word_error_rate(reference("stella"), "".join(chunks)) <= TINY_EN_MAX_WER


def test_one_connection_serves_requests_in_turn_even_sent_early(whisper_gateway: GatewayProcess) -> None:
    """A client may send its next event before the transcript arrives: it is answered after it."""

    async def main() -> tuple[list[Event | None], list[Event | None]]:
        async with connect(whisper_gateway.wyoming_port) as client:
            await send_audio(client, clip("hello"), language="en")
            await client.write_event(Describe().event())
            first = await read_until(client, "info")
            await send_audio(client, clip("coffee"), language="en")
            return first, await read_until(client, "transcript-stop")

    first, second = run(main())
    types = [event.type if event else None for event in first]
    assert types == ["transcript-start", "transcript-chunk", "transcript", "transcript-stop", "info"], first
    assert transcript_text(first) == "Hello world."
    assert word_error_rate(reference("coffee"), transcript_text(second)) <= TINY_EN_MAX_WER


def test_other_formats_are_converted_to_16_khz_mono(whisper_gateway: GatewayProcess) -> None:
    """48 kHz stereo 16-bit and 22.05 kHz 8-bit arrive at the worker as the same 16 kHz audio (the echo
    provider reports the length and level it saw); whisper still gets the words."""
    pcm16 = clip("coffee")
    samples = np.frombuffer(pcm16, dtype="<i2")
    original = samples.astype(np.float32) / 32768.0
    stereo48 = np.repeat(resample(samples, 48000), 2).tobytes()
    u8 = (resample(samples, 22050).astype(np.int32) // 256 + 128).astype(np.uint8).tobytes()

    async def main() -> tuple[str, str, str, str]:
        port = whisper_gateway.wyoming_port
        same = transcript_text(await transcribe(port, pcm16, name="echo"))
        stereo = transcript_text(await transcribe(port, stereo48, rate=48000, channels=2, name="echo"))
        narrow = transcript_text(await transcribe(port, u8, rate=22050, width=1, name="echo"))
        words = transcript_text(await transcribe(port, stereo48, rate=48000, channels=2, language="en"))
        return same, stereo, narrow, words

    same, stereo, narrow, words = run(main())
    assert same == echo_text(original)
    seconds, rms = (float(v) for v in re.fullmatch(r"echo ([\d.]+)s rms=([\d.]+)", stereo).groups())  # type: ignore[union-attr]
    assert seconds == pytest.approx(original.size / 16000, abs=0.001)  # one resampler per stream: no drift
    assert rms == pytest.approx(float(np.sqrt(np.mean(original.astype(np.float64) ** 2))), rel=0.05)
    assert re.fullmatch(rf"echo {original.size / 16000:.3f}s rms=[\d.]+", narrow), narrow
    assert word_error_rate(reference("coffee"), words) <= TINY_EN_MAX_WER, words


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz int16 → ``rate`` int16, whole, with FFmpeg."""
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 16000
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def test_bad_input_gets_an_error_and_the_server_carries_on(whisper_gateway: GatewayProcess) -> None:
    port = whisper_gateway.wyoming_port

    async def chunk_without_start() -> None:
        async with connect(port) as client:
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=clip("hello")[:2048]).event())
            assert "audio-start" in (await expect_error_then_close(client, "BAD_REQUEST")).text

    async def stop_without_start() -> None:
        async with connect(port) as client:
            await client.write_event(AudioStop().event())
            await expect_error_then_close(client, "BAD_REQUEST")

    async def garbage() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00\xffGET / HTTP/1.1 this is not json\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), STEP_S)
        assert b'"type": "error"' in line, line
        assert await asyncio.wait_for(reader.read(), STEP_S)  # the error's data; then the close
        writer.close()

    async def huge_payload() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = b'{"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 2147483648}\n'
        writer.write(header)  # the 2 GiB never follow: the server must answer from the header alone
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), STEP_S)
        assert b'"type": "error"' in line, line
        rest = await asyncio.wait_for(reader.read(), STEP_S)
        assert b"BAD_REQUEST" in rest and b"payload_length" in rest, rest
        writer.close()

    async def unknown_type_is_ignored() -> None:
        async with connect(port) as client:
            await client.write_event(Event(type="frobnicate", data={"x": 1}, payload=b"\x01\x02"))
            await client.write_event(Describe().event())
            event = await client.read_event()
            assert event is not None and Info.is_type(event.type), event

    async def unknown_model() -> None:
        async with connect(port) as client:
            await send_audio(client, clip("hello"), name="nope")
            error = await expect_error_then_close(client, "UNKNOWN_PROVIDER")
            assert "nope" in error.text

    async def bad_format() -> None:
        async with connect(port) as client:
            await client.write_event(AudioStart(rate=16000, width=3, channels=1).event())
            await expect_error_then_close(client, "INVALID_AUDIO")

    async def main() -> None:
        for case in (
            chunk_without_start,
            stop_without_start,
            garbage,
            huge_payload,
            unknown_type_is_ignored,
            unknown_model,
            bad_format,
        ):
            await asyncio.wait_for(case(), STEP_S)
            await still_serves(port)

    run(main(), timeout=110)


def test_open_connections_show_in_the_gateway_metrics(whisper_gateway: GatewayProcess) -> None:
    async def main() -> None:
        async with connect(whisper_gateway.wyoming_port) as first, connect(whisper_gateway.wyoming_port) as second:
            for client in (first, second):  # an answer proves the server holds the connection
                await client.write_event(Describe().event())
                assert (await client.read_event()) is not None
            await wait_for_value(lambda: wyoming_gauge(whisper_gateway), 2)
        await wait_for_value(lambda: wyoming_gauge(whisper_gateway), 0)

    run(main())


def test_a_busy_pool_answers_with_the_hubs_code(gateway_factory: Callable[..., GatewayProcess]) -> None:
    """One echo worker, no queue: while the SDK holds it, a Wyoming request gets POOL_BUSY; then it is served."""
    gateway = gateway_factory({"echo": {"type": "echo", "pool": {"min_size": 1, "max_size": 1, "max_queue": 0}}})
    pcm = clip("hello")

    def hold_the_worker() -> str:
        with gateway.hub.client() as client:
            return client.transcribe(np.zeros(1600, dtype=np.float32), "echo", sleep=3.0).text

    def busy_workers() -> float:
        with gateway.hub.client() as client:
            return float(client.status()["providers"]["echo"]["workers_by_state"]["busy"])

    async def main() -> str:
        holder = asyncio.ensure_future(asyncio.to_thread(hold_the_worker))
        await wait_for_value(busy_workers, 1)
        async with connect(gateway.wyoming_port) as client:
            await send_audio(client, pcm)
            assert "retry" in (await expect_error_then_close(client, "POOL_BUSY")).text
        await holder
        return transcript_text(await transcribe(gateway.wyoming_port, pcm))

    assert run(main()) == echo_text(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0)


# --- a server in this process, on the same hub -------------------------------------------------------


@asynccontextmanager
async def local_server(endpoint: str, **settings: Any) -> AsyncIterator[tuple[Gateway, wyoming_asr.WyomingServer, int]]:
    idle_timeout = settings.pop("idle_timeout", wyoming_asr.IDLE_TIMEOUT_S)
    max_connections = settings.pop("max_connections", wyoming_asr.MAX_CONNECTIONS)
    gateway = Gateway(Settings(hubs=(endpoint,), section=GatewaySection(), **settings))
    await gateway.start()
    port = free_port()
    server = await wyoming_asr.start(
        gateway, "127.0.0.1", port, idle_timeout=idle_timeout, max_connections=max_connections
    )
    try:
        yield gateway, server, port
    finally:
        await server.stop()
        await gateway.stop()


def open_connections(gateway: Gateway) -> float:
    value = gateway.metrics.registry.get_sample_value("asr_hub_gateway_wyoming_connections_open")
    assert value is not None
    return value


def test_a_silent_client_is_timed_out_and_counted(whisper_gateway: GatewayProcess) -> None:
    async def main() -> None:
        async with local_server(whisper_gateway.hub.endpoint, idle_timeout=0.5) as (gateway, _, port):
            async with connect(port) as client:
                await wait_for_value(lambda: open_connections(gateway), 1)
                started = time.monotonic()
                await expect_error_then_close(client, "IDLE_TIMEOUT")
                assert 0.4 <= time.monotonic() - started < 5
            await wait_for_value(lambda: open_connections(gateway), 0)
            await still_serves(port)

    run(main())


def test_beyond_max_connections_a_new_connection_is_told_and_closed(whisper_gateway: GatewayProcess) -> None:
    async def main() -> None:
        async with local_server(whisper_gateway.hub.endpoint, max_connections=2) as (gateway, _, port):
            async with connect(port), connect(port):
                await wait_for_value(lambda: open_connections(gateway), 2)
                async with connect(port) as third:
                    error = await expect_error_then_close(third, "TOO_MANY_REQUESTS")
                    assert "gateway.max_connections" in error.text
            await wait_for_value(lambda: open_connections(gateway), 0)
            await still_serves(port)  # room again once the two have gone

    run(main())


def test_audio_beyond_the_hubs_bound_is_refused(whisper_gateway: GatewayProcess) -> None:
    async def main() -> None:
        async with local_server(whisper_gateway.hub.endpoint, max_audio_seconds=2.0) as (gateway, _, port):
            async with connect(port) as client:
                await send_audio(client, clip("coffee"))  # 3.6 s
                assert "max_audio_seconds" in (await expect_error_then_close(client, "UPLOAD_TOO_LARGE")).text
            assert gateway.in_flight == 0
            await still_serves(port)

    run(main())


def test_a_client_that_leaves_and_a_server_that_stops_leave_nothing_behind(
    whisper_gateway: GatewayProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub.gateway.wyoming")

    async def main() -> None:
        async with local_server(whisper_gateway.hub.endpoint) as (gateway, server, port):
            async with connect(port) as client:  # leaves right after audio-stop
                await send_audio(client, clip("stella"))
            await wait_for_value(lambda: open_connections(gateway), 0)
            assert gateway.in_flight == 0
            assert "the hub job was cancelled" in caplog.text
            await still_serves(port)

            client = AsyncTcpClient("127.0.0.1", port, connect_timeout=5, read_timeout=STEP_S)
            await client.connect()
            await send_audio(client, clip("stella"))  # in flight when the server stops
            await server.stop()
            events = await read_until(client, "transcript")
            with contextlib.suppress(ConnectionResetError):
                await client.disconnect()
            assert events[-1] is None or events[-1].type != "transcript", events
            assert open_connections(gateway) == 0 and gateway.in_flight == 0
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    run(main())
