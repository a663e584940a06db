"""OpenAI-compatible speech-to-text: ``/v1/audio/transcriptions``, ``/v1/audio/translations``, ``/v1/models``.

Field by field as OpenAI's API and its Python SDK send them: ``file``, ``model``, ``language``,
``prompt`` (whisper's ``initial_prompt``), ``response_format``, ``temperature``,
``timestamp_granularities[]`` and ``stream`` (server-sent events). Fields OpenAI has that a hub
cannot use (``include[]``, ``chunking_strategy``) are accepted and ignored, so clients work unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive

from hub.audio import decode_into, decoded_room, upload_peak_bytes
from hub.errors import HubError, InvalidAudio
from hub.gateway.budget import Reservation
from hub.gateway.errors import ApiError, describe
from hub.gateway.formats import FORMATS, MEDIA_TYPES, render
from hub.gateway.state import Gateway, Slot
from hub.gateway.upload import Form, declared_length, read_form
from hub.protocol import SAMPLE_RATE
from hub.results import Segment, Transcript
from hub.shm import PcmBuffer

router = APIRouter()


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> Response:
    return await _serve(request, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request) -> Response:
    return await _serve(request, "translate")


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    gateway.keys.check(request.headers.get("authorization"))
    names = [m["id"] for m in gateway.models()] + gateway.routes()
    return {"object": "list", "data": [_model(name) for name in dict.fromkeys(names)]}


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    gateway = gateway_of(request)
    gateway.keys.check(request.headers.get("authorization"))
    provider = gateway.provider_for(model_id)
    known = {m["id"] for m in gateway.models()} | set(gateway.routes())
    if provider is not None and provider not in known:
        raise ApiError("UNKNOWN_PROVIDER", f"no model named {model_id!r}; GET /v1/models lists them", param="model")
    return _model(model_id)


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "asr-hub"}


async def _serve(request: Request, task: str) -> Response:
    gateway = gateway_of(request)
    gateway.keys.check(request.headers.get("authorization"))
    held = Held(gateway.admit(), gateway.budget.reservation())
    handed_over = False
    try:
        call, audio = await _read(request, gateway, task, held)
        if (key := request.headers.get("x-route-key")) and "route_key" not in call.options:
            call.options["route_key"] = key  # a sticky route keeps this user on one model version
        provider = gateway.provider_for(call.model)
        if call.stream:
            response = await _stream(gateway, provider, call, audio, held)
            handed_over = True  # held until the last event is sent
            return response
        transcript = await _until_disconnect(
            gateway.client.transcribe(audio, provider, **call.options), request.receive
        )
    finally:
        if not handed_over:
            held.release()
    body = render(transcript, call.response_format, task, call.words)
    if isinstance(body, dict):
        return JSONResponse(body)
    return PlainTextResponse(body, media_type=MEDIA_TYPES[call.response_format])


@dataclass
class Held:
    """What one request holds until its answer is sent: its concurrency slot, its share of the memory budget
    and its decoded audio (a segment the hub reads, given back here unless the hub request took it over)."""

    slot: Slot
    reservation: Reservation
    audio: PcmBuffer | None = None

    def release(self) -> None:
        if self.audio is not None:
            self.audio.release()
        self.reservation.release()
        self.slot.release()


async def _read(request: Request, gateway: Gateway, task: str, held: Held) -> tuple[_Call, PcmBuffer]:
    """The form, checked, and its audio decoded off the event loop straight into ``held.audio``, within the
    memory budget: an upload with a Content-Length reserves its room before its body is read."""
    settings = gateway.settings
    peak = partial(upload_peak_bytes, max_audio_seconds=settings.max_audio_seconds)
    length = declared_length(request.headers.get("content-length"), settings.max_upload_bytes)
    if length is not None:
        await held.reservation.grow_to(peak(length))
    form = await read_form(
        request.headers.get("content-type", ""),
        request.headers.get("content-length"),
        request.stream(),
        settings.max_upload_bytes,
        on_read=lambda received: held.reservation.grow_to(peak(received)),
        pause=settings.section.header_timeout,
    )
    call = _Call(form, gateway, task)
    del form
    name = f"the uploaded file {call.filename!r}"
    limit = int(settings.max_audio_seconds * SAMPLE_RATE)
    room = decoded_room(call.audio)
    audio = held.audio = await gateway.client.pcm_buffer(min(room or limit + 1, limit + 1))
    audio.size = await asyncio.to_thread(_fill, audio, call.audio, name)
    call.audio = bytearray()  # the upload's memory goes back now; only its PCM is held from here on
    if audio.size > limit:
        seconds = f"{room / SAMPLE_RATE:.0f} s" if room else f"more than {settings.max_audio_seconds:.0f} s"
        raise ApiError(
            "UPLOAD_TOO_LARGE",
            f"the audio is {seconds} long, longer than this hub accepts "
            f"({settings.max_audio_seconds:.0f} s, hub.max_audio_seconds); split it",
            param="file",
        )
    inline = audio.segment is None  # the request then copies the samples into its message
    held.reservation.settle(audio.size * 4 * (2 if inline else 1))
    return call, audio


def _fill(buffer: PcmBuffer, data: bytearray, name: str) -> int:
    """Decode into the buffer. No view of a shared-memory segment may outlive this call (the segment could not
    be closed), so an error leaves with its own frame only, not those that held the view."""
    try:
        return decode_into(data, name, buffer.view())
    except InvalidAudio as exc:
        raise exc.with_traceback(None) from None


class _Call:
    """The form's fields, checked, as the options of one hub request."""

    def __init__(self, form: Form, gateway: Gateway, task: str) -> None:
        upload = form.files.get("file")
        if upload is None:
            raise ApiError("BAD_REQUEST", "the form has no 'file' part: send the audio as a file named 'file'", "file")
        self.filename, self.audio = upload  # the audio is dropped once decoded
        self.model = form.get("model")
        self.response_format = form.get("response_format") or "json"
        if self.response_format not in FORMATS:
            raise ApiError(
                "BAD_REQUEST",
                f"response_format must be one of {', '.join(FORMATS)}, got {self.response_format!r}",
                "response_format",
            )
        granularities = set(form.all("timestamp_granularities[]") + form.all("timestamp_granularities"))
        if granularities - {"word", "segment"}:
            raise ApiError(
                "BAD_REQUEST", "timestamp_granularities[] takes 'word' and 'segment'", "timestamp_granularities"
            )
        self.words = "word" in granularities
        self.stream = _flag(form.get("stream"), "stream")
        if self.stream and self.response_format not in ("json", "text"):
            raise ApiError(
                "BAD_REQUEST", "stream=true gives server-sent events; use response_format json or text", "stream"
            )
        self.options: dict[str, Any] = {}
        if task == "translate":
            self.options["task"] = "translate"
        if language := form.get("language"):
            self.options["language"] = language
        if prompt := form.get("prompt"):
            self.options["initial_prompt"] = prompt
        if (temperature := form.get("temperature")) not in (None, ""):
            self.options["temperature"] = _number(temperature, "temperature")
        if self.words:
            self.options["word_timestamps"] = True
        if route_key := form.get("route_key"):
            self.options["route_key"] = route_key
        if form.get("split") not in (None, ""):
            self.options["split"] = _flag(form.get("split"), "split")
        self.options["timeout"] = gateway.settings.section.request_timeout


def _flag(value: str | None, name: str) -> bool:
    if value in (None, "", "false", "False", "0"):
        return False
    if value in ("true", "True", "1"):
        return True
    raise ApiError("BAD_REQUEST", f"{name} must be true or false, got {value!r}", name)


def _number(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ApiError("BAD_REQUEST", f"{name} must be a number, got {value!r}", name) from None


async def _until_disconnect(work: Any, receive: Receive) -> Transcript:
    """Run the hub request; if the HTTP client goes away first, cancel it (the hub then drops the job)."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not job.done():
            job.cancel()
        gone.cancel()
    if not job.done() or job.cancelled():
        raise ApiError("CLIENT_CLOSED", "the client closed the connection; its job was cancelled")
    return job.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _stream(gateway: Gateway, provider: str | None, call: _Call, audio: PcmBuffer, held: Held) -> Response:
    """Server-sent events in OpenAI's shape: a ``transcript.text.delta`` per segment, then ``transcript.text.done``.

    The first event is awaited before the response starts, so a request the hub refuses still gets
    its HTTP status; an error after that arrives as an ``error`` event."""
    events = gateway.client.transcribe_stream(audio, provider, **call.options)
    first = await anext(events)

    async def body() -> AsyncIterator[bytes]:
        event: Segment | Transcript = first
        try:
            while True:
                if isinstance(event, Transcript):
                    yield _sse({"type": "transcript.text.done", "text": event.text})
                    return
                yield _sse({"type": "transcript.text.delta", "delta": event.text})
                event = await anext(events)
        except HubError as exc:
            yield _sse(describe(exc)[1])
        finally:
            await events.aclose()
            held.release()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
