"""``GET /v1/stream``: live transcription over a WebSocket, one hub session (``open_stream``) per connection.

The client sends a JSON config, then raw PCM in binary frames of any size, then ``{"type": "close"}``;
it reads partial and final text as the session settles it, then the whole transcript (docs/api.md has
the protocol). Three tasks serve a connection: ``receive`` turns frames into 16 kHz PCM (one resampler
for the whole stream) and puts it on a bounded queue, ``feed`` hands it to the hub session, ``forward``
relays the session's events. When the hub pushes back (its ring is full), ``feed`` waits, the queue
fills, ``receive`` stops reading and TCP slows the client down: nothing grows without bound, and no
other connection waits for this one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket

from hub.audio import StreamResampler, check_sample_rate
from hub.client import AsyncStreamSession
from hub.errors import HubError, InvalidAudio
from hub.gateway.errors import ApiError, mapping, ws_event
from hub.gateway.sockets import ClientGone, authorization, close, end_session, send_json
from hub.gateway.state import Gateway
from hub.protocol import SAMPLE_RATE
from hub.results import Segment, Transcript

log = logging.getLogger("hub.gateway")

router = APIRouter()

ENCODINGS: dict[str, np.dtype[Any]] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
CONFIG_KEYS = frozenset({"type", "model", "language", "sample_rate", "encoding", "turn_detection"})
CONFIG_TIMEOUT_S = 10.0  # a connection that sends no config by then is closed
PIECE_BYTES = 64 * 1024  # frames are cut into pieces of at most this many bytes before they are queued
QUEUE_PIECES = 16  # so a connection holds at most about one frame plus 16 pieces of audio
GRACE_S = 2.0  # how long the tasks that watch a session get to see that it ended


@dataclass(frozen=True)
class LiveConfig:
    """The first message of a stream: which model, which language, and what the binary frames hold."""

    model: str | None = None
    language: str | None = None
    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm_s16le"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the hub, which checks them per model
    turn_detection: dict[str, Any] | None = None  # the session's own stream.vad settings (the hub checks them)


def parse_config(text: str) -> LiveConfig:
    """The config message, checked; a mistake is ``BAD_REQUEST`` naming the field."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(
            "BAD_REQUEST",
            'the first message must be a JSON object, e.g. {"model": "whisper-1", "sample_rate": 48000, '
            '"encoding": "pcm_s16le"}',
        )
    if body.get("type", "config") != "config":
        raise ApiError("BAD_REQUEST", f"the first message must be the config, got type {body['type']!r}", "type")
    for name in ("model", "language"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ApiError("BAD_REQUEST", f"{name} must be a string, got {body[name]!r}", name)
    try:
        rate = check_sample_rate(body.get("sample_rate", SAMPLE_RATE))
    except InvalidAudio as exc:
        raise ApiError("BAD_REQUEST", exc.message, "sample_rate") from None
    encoding = body.get("encoding", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ApiError("BAD_REQUEST", f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}", "encoding")
    options = {k: v for k, v in body.items() if k not in CONFIG_KEYS}
    if "timeout" in options:
        raise ApiError("BAD_REQUEST", "timeout is set by the gateway (gateway.request_timeout)", "timeout")
    turns = body.get("turn_detection")
    if turns is not None and not isinstance(turns, dict):
        raise ApiError(
            "BAD_REQUEST", 'turn_detection must be an object, e.g. {"vad": true, "endpoint_ms": 600}', "turn_detection"
        )
    return LiveConfig(body.get("model"), body.get("language"), rate, encoding, options, turns)


def parse_control(text: str) -> None:
    """After the config, the only text message is ``{"type": "close"}``."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("type") != "close":
        raise ApiError(
            "BAD_REQUEST", 'after the config, text messages must be {"type": "close"}; send audio as binary frames'
        )


class LiveAudio:
    """Binary frames in, float32 16 kHz out. A sample may be split across frames (its bytes wait for
    the rest), and one resampler serves the whole stream, so the audio keeps its exact length."""

    def __init__(self, encoding: str, rate: int) -> None:
        self.dtype = ENCODINGS[encoding]
        self._rest = b""
        self._resampler = StreamResampler(rate)

    def feed(self, data: bytes) -> np.ndarray:
        data = self._rest + data
        usable = len(data) - len(data) % self.dtype.itemsize
        self._rest = data[usable:]
        samples = np.frombuffer(data, dtype=self.dtype, count=usable // self.dtype.itemsize)
        return self._resampler.feed(samples.astype(self.dtype.newbyteorder("="), copy=False))

    def finish(self) -> np.ndarray:
        if self._rest:
            raise InvalidAudio(
                f"the stream ended inside a sample ({len(self._rest)} byte(s) left over): "
                f"{self.dtype.itemsize}-byte samples must be sent whole, though a frame may split them"
            )
        return self._resampler.flush()


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    await websocket.accept()  # before any check, so that even a refusal can say why
    gateway.metrics.websockets.inc()
    slot = None
    session: AsyncStreamSession | None = None
    try:
        gateway.keys.check(authorization(websocket))
        slot = gateway.admit()
        config = await _read_config(websocket)
        session = await gateway.client.open_stream(
            gateway.provider_for(config.model),
            language=config.language,
            timeout=gateway.settings.section.request_timeout,
            turn_detection=config.turn_detection,
            **config.options,
        )
        transcript = await _Live(websocket, session, config).run()
        reason = str(transcript.extra.get("closed_reason", ""))
        await send_json(websocket, _transcript_event(transcript))
        await close(websocket, 1000, reason)
    except (ApiError, HubError) as exc:
        await _refuse(websocket, exc)
    except ClientGone:
        log.debug("a live-stream client went away")
    finally:
        if session is not None:
            await end_session(session)
        if slot is not None:
            slot.release()
        gateway.metrics.websockets.dec()


class _Live:
    """One connection's three tasks and what they share."""

    def __init__(self, websocket: WebSocket, session: AsyncStreamSession, config: LiveConfig) -> None:
        self.websocket, self.session = websocket, session
        self.audio = LiveAudio(config.encoding, config.sample_rate)
        self.queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue(QUEUE_PIECES)  # None: the client closed
        self.fed = 0  # 16 kHz samples handed to the session

    async def run(self) -> Transcript:
        """Serve the stream to its end; returns the transcript, raises what ended it otherwise."""
        receiver, feeder, forwarder = tasks = [
            asyncio.create_task(w()) for w in (self.receive, self.feed, self.forward)
        ]
        try:
            await _ending(receiver, feeder, forwarder)
        finally:
            # close the session before stopping the tasks that wait on it, so that they end by themselves
            # rather than being cancelled in the middle of the session's own waiting
            receiver.cancel()
            await end_session(self.session)
            if not self.queue.full():
                self.queue.put_nowait(None)  # a feeder waiting for audio stops too
            await asyncio.wait({feeder, forwarder}, timeout=GRACE_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.session.transcript

    async def receive(self) -> None:
        """Frames from the client, as 16 kHz PCM, into the queue, until its close message."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise ClientGone
            data = message.get("bytes")
            if data is None:
                parse_control(message.get("text") or "")
                await self.queue.put(self.audio.finish())
                await self.queue.put(None)
                return
            for start in range(0, len(data), PIECE_BYTES):
                pcm = self.audio.feed(data[start : start + PIECE_BYTES])
                if pcm.size:
                    await self.queue.put(pcm)

    async def feed(self) -> None:
        """PCM from the queue into the hub session; the client's close closes the session."""
        while (pcm := await self.queue.get()) is not None:
            await self.session.send(pcm)
            self.fed += pcm.size
        await self.session.close()

    async def forward(self) -> None:
        """The session's events to the client, until the session is over: partials, finals and, with VAD on,
        ``speech_started``/``speech_stopped`` (``at``) and ``utterance`` (``text``, ``at``) as they come."""
        settled = 0.0  # where the text that may still change begins: the end of the last final
        async for event in self.session.results():
            if event.segment is not None:
                settled = event.segment.end
                await send_json(self.websocket, {"type": "final", **_segment(event.segment)})
            elif event.kind == "partial":
                end = self.fed / SAMPLE_RATE
                await send_json(self.websocket, {"type": "partial", "text": event.text, "start": settled, "end": end})
            elif event.kind == "utterance":
                await send_json(self.websocket, {"type": "utterance", "text": event.text, "at": event.at})
            elif event.kind in ("speech_started", "speech_stopped"):
                await send_json(self.websocket, {"type": event.kind, "at": event.at})


async def _ending(receiver: asyncio.Task[None], feeder: asyncio.Task[None], forwarder: asyncio.Task[None]) -> None:
    """Wait until the stream is over. The forwarder sees every end of the session (the client's close,
    the hub's own close, a hub error) and has the last word; before it, only the client side can fail
    on its own (it vanished, it broke the protocol, its audio is bad), and a send to the hub that fails
    for a reason the session never reports."""
    waiting = {receiver, feeder, forwarder}
    while not forwarder.done():
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if receiver in done and (error := receiver.exception()) is not None:
            raise error
        if feeder in done:
            await asyncio.wait({forwarder}, timeout=GRACE_S)
            if not forwarder.done():
                feeder.result()
    forwarder.result()


async def _read_config(websocket: WebSocket) -> LiveConfig:
    try:
        message = await asyncio.wait_for(websocket.receive(), CONFIG_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError(
            "BAD_REQUEST",
            f"no config message within {CONFIG_TIMEOUT_S:.0f} s of connecting: send the JSON config first",
        ) from None
    if message["type"] == "websocket.disconnect":
        raise ClientGone
    if message.get("bytes") is not None:
        raise ApiError(
            "UNSUPPORTED_DATA", "a binary frame came before the config: send the JSON config as a text message first"
        )
    return parse_config(message.get("text") or "")


def _segment(segment: Segment) -> dict[str, Any]:
    body = {"text": segment.text, "start": segment.start, "end": segment.end}
    if segment.words:
        body["words"] = [
            {"word": w.word, "start": w.start, "end": w.end, "probability": w.probability} for w in segment.words
        ]
    return body


def _transcript_event(transcript: Transcript) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "transcript",
        "text": transcript.text,
        "segments": [_segment(s) for s in transcript.segments],
        "language": transcript.language,
        "duration": transcript.duration,
    }
    if "closed_reason" in transcript.extra:
        body["closed_reason"] = transcript.extra["closed_reason"]
    return body


async def _refuse(websocket: WebSocket, exc: ApiError | HubError) -> None:
    """The error event, then the close code the errors table gives, with the message as the reason."""
    if mapping(exc.code).close == 1011:
        log.warning("live stream failed: %s %s", exc.code, exc.message)
    try:
        await send_json(websocket, ws_event(exc))
    except ClientGone:
        return
    await close(websocket, mapping(exc.code).close, exc.message)
