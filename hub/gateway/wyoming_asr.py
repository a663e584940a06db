"""The Wyoming protocol (Home Assistant's voice pipeline) over TCP, on top of the gateway's hub client.

One connection serves any number of requests, one at a time: ``describe`` → ``info``; ``transcribe``
(optional: ``name`` = a provider or alias, ``language``), ``audio-start``, ``audio-chunk``…,
``audio-stop`` → ``transcript-start``, ``transcript-chunk``…, ``transcript``, ``transcript-stop``.

The audio is collected (converted to 16 kHz 16-bit mono as it arrives, with one resampler per stream)
and sent to the hub as one request at ``audio-stop``. A live session fed while the user speaks was
measured slower to the final text and less accurate for voice commands: closing it re-decodes the
window, often after waiting for a decode already under way, and LocalAgreement sometimes commits an
early guess; it also leases a worker for the whole utterance. Segments are sent as ``transcript-chunk``
events as the worker decodes them; the chunks join to exactly the ``transcript`` text.

Bad input ends the connection with an ``error`` event that carries the hub's code (``BAD_REQUEST`` for
framing and ordering mistakes): after garbage the byte stream cannot be trusted, and a client that skips
``audio-start`` is out of step with every event that follows. Unknown event types are dropped, as the
protocol asks. A connection silent for ``idle_timeout`` seconds while it has nothing in flight is closed (half
an event line then nothing included); beyond ``max_connections`` open ones, a new connection gets a
``TOO_MANY_REQUESTS`` error and is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from hub import __version__
from hub.audio import StreamResampler, check_sample_rate
from hub.errors import HubError, InvalidAudio
from hub.gateway.errors import ApiError, ws_event
from hub.gateway.state import Gateway, Slot
from hub.protocol import SAMPLE_RATE
from hub.provider_types import PROVIDER_TYPES
from hub.results import Segment, join_text

log = logging.getLogger("hub.gateway.wyoming")

IDLE_TIMEOUT_S = 30.0  # a connection with nothing in flight that sends nothing this long is closed
MAX_CONNECTIONS = 1000
MAX_DATA_BYTES = 64 * 1024  # an event's extra JSON data (the header line itself is bounded by the reader: 64 KiB)
MAX_PAYLOAD_BYTES = 1024 * 1024  # one audio chunk: 32 s of 16 kHz 16-bit mono; Home Assistant sends ~2 KiB
INFO_WAIT_S = 3.0  # how long ``describe`` waits for the gateway's first look at the hub
STOP_WAIT_S = 5.0  # how long ``stop`` waits for the connections' handlers to finish

# the languages a multilingual Whisper model accepts (faster-whisper's list)
WHISPER_LANGUAGES = tuple(
    "af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu hy "
    "id is it ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro ru "
    "sa sd si sk sl sn so sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue".split()
)
SENSEVOICE_LANGUAGES = ("zh", "en", "yue", "ja", "ko")
# Wyoming's width in bytes → samples
SAMPLE_TYPES: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
MAX_CHANNELS = 8
ATTRIBUTIONS = {t.name: Attribution(name=t.credit, url=t.homepage) for t in PROVIDER_TYPES.values() if t.credit}
HUB_ATTRIBUTION = Attribution(name="ASR Hub", url="")


# --- what ``describe`` answers -------------------------------------------------------------


def model_languages(provider: Mapping[str, Any]) -> list[str]:
    """The languages a provider's model speaks, from its type and model name.

    Whisper: ``*.en`` and distil-whisper models are English only, the others take Whisper's 100
    languages. FunASR: SenseVoice speaks zh/en/yue/ja/ko, a model named ``*-en``/``*_en`` English,
    any other Paraformer Mandarin (FunASR's default models are Chinese). Other types (echo, a
    fault-injection provider) claim none, so Home Assistant does not offer them a language."""
    model = PurePath(str(provider.get("model") or "")).name.lower()
    kind = provider.get("type")
    if kind == "whisper":
        return ["en"] if model.endswith(".en") or model.startswith("distil") else list(WHISPER_LANGUAGES)
    if kind == "funasr":
        if "sensevoice" in model:
            return list(SENSEVOICE_LANGUAGES)
        return ["en"] if model.endswith(("-en", "_en")) else ["zh"]
    return []


def build_info(providers: list[dict[str, Any]]) -> Info:
    """One ``asr`` program, ``asr-hub``, with one model per enabled provider (the hub's default first)."""
    models = [
        AsrModel(
            name=str(p["id"]),
            attribution=ATTRIBUTIONS.get(str(p.get("type")), HUB_ATTRIBUTION),
            installed=not p.get("degraded", False),
            description=f"{p.get('type')} {p.get('model') or ''}".strip(),
            version=None,
            languages=model_languages(p),
        )
        for p in providers
    ]
    program = AsrProgram(
        name="asr-hub",
        attribution=HUB_ATTRIBUTION,
        installed=True,
        description="ASR Hub: speech recognition served by a pool of workers",
        version=__version__,
        models=models,
        supports_transcript_streaming=True,
    )
    return Info(asr=[program])


# --- reading events, with bounds ----------------------------------------------------------


class ProtocolError(Exception):
    """Bytes that are not a Wyoming event (or one larger than we accept)."""


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{key} must be a non-negative integer, got {value!r}")
    if value > limit:
        raise ProtocolError(f"{key} {value} exceeds this server's limit of {limit} bytes")
    return value


def parse_header(line: bytes) -> tuple[str, dict[str, Any], int, int]:
    """A header line → (type, data, data_length, payload_length); ``ProtocolError`` for anything else."""
    try:
        header = json.loads(line)
    except ValueError:
        raise ProtocolError("an event must start with one line of JSON (the header)") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError('an event header must be a JSON object with a string "type"')
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise ProtocolError('an event\'s "data" must be a JSON object')
    return (
        header["type"],
        data,
        _length(header, "data_length", MAX_DATA_BYTES),
        _length(header, "payload_length", MAX_PAYLOAD_BYTES),
    )


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, or None when the peer closed (even mid-event). Unlike the package's own reader,
    lengths are bounded before anything is read, and garbage raises instead of looking like a close."""
    try:
        line = await reader.readline()
    except ValueError:  # no newline within the reader's limit
        raise ProtocolError("an event header line is longer than 64 KiB") from None
    if not line:
        return None
    kind, data, data_length, payload_length = parse_header(line)
    try:
        if data_length:
            try:
                extra = json.loads(await reader.readexactly(data_length))
            except ValueError:
                raise ProtocolError("an event's additional data must be a JSON object") from None
            if not isinstance(extra, dict):
                raise ProtocolError("an event's additional data must be a JSON object")
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=kind, data=data, payload=payload)


# --- audio ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PcmFormat:
    rate: int
    width: int
    channels: int

    @staticmethod
    def of(event: AudioStart | AudioChunk) -> PcmFormat:
        return PcmFormat(event.rate, event.width, event.channels)

    def check(self) -> PcmFormat:
        """This format, if the gateway can take it; ``INVALID_AUDIO`` otherwise."""
        check_sample_rate(self.rate)
        if self.width not in SAMPLE_TYPES:
            raise InvalidAudio(f"width must be 1, 2 or 4 bytes per sample, got {self.width!r}")
        if (
            not isinstance(self.channels, int)
            or isinstance(self.channels, bool)
            or not 1 <= self.channels <= MAX_CHANNELS
        ):
            raise InvalidAudio(f"channels must be an integer from 1 to {MAX_CHANNELS}, got {self.channels!r}")
        return self


NATIVE = PcmFormat(SAMPLE_RATE, 2, 1)  # what Home Assistant sends, and what the hub takes as it is


def mono_float(audio: bytes, fmt: PcmFormat) -> np.ndarray:
    """Interleaved integer PCM → float32 mono in [-1, 1] (channels averaged), at the same rate."""
    samples = np.frombuffer(audio, dtype=SAMPLE_TYPES[fmt.width]).astype(np.float32)
    if fmt.width == 1:
        samples -= 128.0  # 8-bit PCM is unsigned
    samples /= float(2 ** (8 * fmt.width - 1))
    return samples.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32) if fmt.channels > 1 else samples


def to_int16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


class AudioBuffer:
    """One stream's audio as 16 kHz 16-bit mono, bounded. Other formats are mixed down and pass
    through one resampler kept for the whole stream, so the audio keeps its exact length."""

    def __init__(self, fmt: PcmFormat, max_seconds: float) -> None:
        self.format = fmt
        self._max_samples = int(max_seconds * SAMPLE_RATE)
        self._pcm = bytearray()
        self._resampler = None if fmt == NATIVE else StreamResampler(fmt.rate)

    def add(self, audio: bytes) -> None:
        if len(audio) % (self.format.width * self.format.channels):
            raise InvalidAudio(
                f"an audio-chunk of {len(audio)} bytes is not a whole number of {self.format.channels}-channel "
                f"{self.format.width}-byte samples"
            )
        if self._resampler is None:
            self._append(audio)
        else:
            self._append(to_int16(self._resampler.feed(mono_float(audio, self.format))))

    def finish(self) -> np.ndarray:
        """All the audio, as int16 samples at 16 kHz (the resampler's tail included)."""
        if self._resampler is not None:
            self._append(to_int16(self._resampler.flush()))
        return np.frombuffer(self._pcm, dtype="<i2")

    def _append(self, pcm: bytes) -> None:
        if (len(self._pcm) + len(pcm)) // 2 > self._max_samples:
            raise ApiError(
                "UPLOAD_TOO_LARGE",
                f"the audio is longer than this hub accepts ({self._max_samples / SAMPLE_RATE:g} s, hub.max_audio_seconds)",
            )
        self._pcm += pcm


def chunk_texts(emitted: str, segments: list[Segment]) -> tuple[str, str]:
    """The text to send now so that everything sent joins to the transcript so far: (chunk, new emitted)."""
    joined = join_text(s.text for s in segments)
    if not joined.startswith(emitted):
        return "", emitted
    return joined[len(emitted) :], joined


# --- one connection ------------------------------------------------------------------------


@dataclass
class _Request:
    """What ``transcribe`` asked for and the stream under way (from ``audio-start``)."""

    name: str | None = None
    language: str | None = None
    audio: AudioBuffer | None = None
    slot: Slot | None = None


class WyomingHandler(AsyncEventHandler):
    """One client connection. ``run`` replaces the package's loop to bound reads, time out idle clients
    and notice a client that goes away while its transcription runs (the hub job is then cancelled)."""

    def __init__(
        self,
        gateway: Gateway,
        idle_timeout: float,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_finished: Callable[[WyomingHandler], None] = lambda _: None,
        refusal: ApiError | None = None,
    ) -> None:
        super().__init__(reader, writer)
        self.gateway = gateway
        self.idle_timeout = idle_timeout
        self._on_finished = on_finished
        self.refusal = refusal  # said and the connection closed, before anything is read
        self.request = _Request()
        self.finished = asyncio.Event()
        self.task: asyncio.Task[Any] | None = None
        self._next: asyncio.Future[Event | None] | None = None  # an event read while a transcription ran

    async def run(self) -> None:
        self.task = asyncio.current_task()
        self.gateway.metrics.wyoming.inc()
        try:
            await self._serve()
        except (ConnectionError, OSError) as exc:
            log.debug("wyoming client gone: %s", exc)
        except Exception:
            log.exception("wyoming connection failed")
            await self._send_error(ApiError("INTERNAL_ERROR", "the gateway failed on this request; see its log"))
        finally:
            if self._next is not None:
                self._next.cancel()
            self._end_request()
            self.gateway.metrics.wyoming.dec()
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            self.finished.set()
            self._on_finished(self)

    async def _serve(self) -> None:
        if self.refusal is not None:
            await self._send_error(self.refusal)
            return
        while True:
            pending = self._next or asyncio.ensure_future(read_event(self.reader))
            self._next = None
            try:
                event = await asyncio.wait_for(pending, self.idle_timeout)
            except asyncio.TimeoutError:
                await self._send_error(
                    ApiError("IDLE_TIMEOUT", f"no event for {self.idle_timeout:g} s: closing the connection")
                )
                return
            except ProtocolError as exc:
                await self._send_error(ApiError("BAD_REQUEST", str(exc)))
                return
            if event is None:
                return
            try:
                if not await self.handle_event(event):
                    return
            except (HubError, ApiError) as exc:
                await self._send_error(exc)
                return

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event((await self._info()).event())
        elif Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(event.type):
            self._on_transcribe(event)
        elif AudioStart.is_type(event.type):
            self._on_audio_start(event)
        elif AudioChunk.is_type(event.type):
            self._on_audio_chunk(event)
        elif AudioStop.is_type(event.type):
            await self._on_audio_stop()
        else:
            log.debug("wyoming: dropping an event of unknown type %r", event.type)
        return True

    # --- the events ----------------------------------------------------------------------

    async def _info(self) -> Info:
        waited = 0.0
        while not self.gateway.answered() and waited < INFO_WAIT_S:
            await asyncio.sleep(0.1)
            waited += 0.1
        if not self.gateway.answered():
            raise ApiError("HUB_UNREACHABLE", f"no hub has answered yet: {self.gateway.hub_problem}")
        return build_info(self.gateway.models())

    def _on_transcribe(self, event: Event) -> None:
        if self.request.audio is not None:
            raise ApiError("BAD_REQUEST", "transcribe arrived in the middle of an audio stream (before audio-stop)")
        asked = Transcribe.from_event(event)
        for key, value in (("name", asked.name), ("language", asked.language)):
            if value is not None and not isinstance(value, str):
                raise ApiError("BAD_REQUEST", f"transcribe: {key} must be a string, got {value!r}")
        self.request = _Request(name=asked.name, language=asked.language)

    def _on_audio_start(self, event: Event) -> None:
        if self.request.audio is not None:
            raise ApiError("BAD_REQUEST", "audio-start arrived while an audio stream was already open")
        fmt = PcmFormat.of(_audio_event(AudioStart, event)).check()
        self.request.slot = self.gateway.admit()
        self.request.audio = AudioBuffer(fmt, self.gateway.settings.max_audio_seconds)

    def _on_audio_chunk(self, event: Event) -> None:
        audio = self.request.audio
        if audio is None:
            raise ApiError(
                "BAD_REQUEST", "audio-chunk without audio-start: send transcribe, audio-start, then the chunks"
            )
        chunk = _audio_event(AudioChunk, event)
        if PcmFormat.of(chunk) != audio.format:
            raise InvalidAudio(f"audio-chunk format {PcmFormat.of(chunk)} differs from audio-start's {audio.format}")
        audio.add(chunk.audio)

    async def _on_audio_stop(self) -> None:
        audio = self.request.audio
        if audio is None:
            raise ApiError("BAD_REQUEST", "audio-stop without audio-start")
        request, self.request = self.request, _Request()
        try:
            await self._transcribe_watching_client(request, audio.finish())
        finally:
            if request.slot is not None:
                request.slot.release()

    async def _transcribe_watching_client(self, request: _Request, pcm: np.ndarray) -> None:
        """Transcribe while reading on: a client that closes (or sends garbage) meanwhile has abandoned the
        request, whose hub job is cancelled; an event it sends early is handled after the transcript."""
        job = asyncio.ensure_future(self._transcribe(request, pcm))
        watch = self._next = asyncio.ensure_future(read_event(self.reader))
        try:
            await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done() and (watch.exception() is not None or watch.result() is None):
                log.info("wyoming client left before its transcript: the hub job was cancelled")
                return  # the loop takes the close (or the garbage) from self._next
            await job
        finally:
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError, HubError):
                    await job

    async def _transcribe(self, request: _Request, pcm: np.ndarray) -> None:
        segments: list[Segment] = []
        emitted = ""
        started = False
        if pcm.size == 0:  # audio-stop straight after audio-start: nothing was said
            text, language = "", request.language
        else:
            provider = self.gateway.provider_for(request.name)
            options: dict[str, Any] = {"language": request.language} if request.language else {}
            result = None
            async for item in self.gateway.client.transcribe_stream(pcm, provider, **options):
                if not started:
                    await self.write_event(TranscriptStart(language=request.language).event())
                    started = True
                if isinstance(item, Segment):
                    segments.append(item)
                    chunk, emitted = chunk_texts(emitted, segments)
                    if chunk:
                        await self.write_event(TranscriptChunk(text=chunk).event())
                else:
                    result = item
            assert result is not None
            text, language = result.text, result.language or request.language
        if not started:
            await self.write_event(TranscriptStart(language=request.language).event())
        if text.startswith(emitted) and text != emitted:
            await self.write_event(TranscriptChunk(text=text[len(emitted) :]).event())
        await self.write_event(Transcript(text=text, language=language).event())
        await self.write_event(TranscriptStop().event())

    # --- plumbing ------------------------------------------------------------------------

    async def write_event(self, event: Event) -> None:
        if not self.writer.is_closing():
            await async_write_event(event, self.writer)

    async def _send_error(self, exc: HubError | ApiError) -> None:
        body = ws_event(exc)
        log.info("wyoming error %s: %s", body["code"], body["message"])
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            await self.write_event(Error(text=body["message"], code=body["code"]).event())

    def _end_request(self) -> None:
        if self.request.slot is not None:
            self.request.slot.release()
        self.request = _Request()


def _audio_event(kind: type[AudioStart] | type[AudioChunk], event: Event) -> Any:
    try:
        return kind.from_event(event)
    except KeyError as exc:
        raise ApiError("BAD_REQUEST", f"{event.type} needs rate, width and channels (missing {exc})") from None


# --- the server ----------------------------------------------------------------------------


class WyomingServer:
    """The listening socket and its connections; ``stop`` closes both (hub jobs in flight are cancelled)."""

    def __init__(self, gateway: Gateway, host: str, port: int, idle_timeout: float, max_connections: int) -> None:
        self.gateway, self.idle_timeout, self.max_connections = gateway, idle_timeout, max_connections
        self._server = AsyncTcpServer(host, port)
        self._handlers: set[WyomingHandler] = set()

    async def start(self) -> None:
        await self._server.start(self._handler)

    def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> WyomingHandler:
        if len(self._handlers) >= self.max_connections:
            refusal = ApiError(
                "TOO_MANY_REQUESTS",
                f"{len(self._handlers)} Wyoming connections are open (gateway.max_connections); retry shortly",
            )
            return WyomingHandler(self.gateway, self.idle_timeout, reader, writer, refusal=refusal)
        handler = WyomingHandler(self.gateway, self.idle_timeout, reader, writer, self._handlers.discard)
        self._handlers.add(handler)
        return handler

    async def stop(self) -> None:
        """Close the listening socket, then every connection; wait for their handlers to clean up."""
        await self._server.stop()
        handlers = list(self._handlers)
        await asyncio.gather(*(h.stop() for h in handlers))
        waits = [asyncio.ensure_future(h.finished.wait()) for h in handlers]
        if waits:
            _, late = await asyncio.wait(waits, timeout=STOP_WAIT_S)
            for wait in late:
                wait.cancel()
        for handler in handlers:
            if not handler.finished.is_set() and handler.task is not None:
                handler.task.cancel()


async def start(
    gateway: Gateway,
    host: str,
    port: int,
    *,
    idle_timeout: float = IDLE_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> WyomingServer:
    """Serve Wyoming on ``host:port`` until ``stop``."""
    server = WyomingServer(gateway, host, port, idle_timeout, max_connections)
    await server.start()
    return server
