"""``GET /v1/realtime?intent=transcription`` (or ``?model=NAME``): OpenAI's Realtime API, transcription
sessions, over the hub's live sessions.

The client configures the session (``session.update``, or the beta ``transcription_session.update``),
appends base64 pcm16 at 24 kHz, and commits (or lets the hub's VAD end each turn); it reads deltas and
the completed transcript of each item. ``realtime_events`` holds the protocol without I/O; this module
only moves events. One hub session serves the audio until a commit, a clear, or a change of model,
language, prompt or turn detection ends it: ending it makes the worker decode the last words at once, and the next
audio opens another (the ``session.created`` event reports the connection's own session id).

Four tasks serve a connection: ``receive`` reads client events and queues audio and commands (a bounded
queue), ``feed`` carries them out in order against the hub session, ``forward`` (one per hub session)
turns the session's events into items, ``send`` writes the outbox to the client. The outbox is bounded
too, and ``receive`` reads nothing while it is full: a client that never reads is held back by TCP,
not buffered without bound, and the hub session, no longer fed, stops making events.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import Any

from fastapi import APIRouter, WebSocket

from hub.client import AsyncStreamSession
from hub.errors import HubError
from hub.gateway.errors import ApiError, mapping
from hub.gateway.live import PIECE_BYTES, QUEUE_PIECES
from hub.gateway.realtime_events import (
    DEFAULT_MODEL,
    RATE,
    AppendAudio,
    ClearBuffer,
    ClientEvent,
    CommitBuffer,
    Dialect,
    ErrorCode,
    Problem,
    SessionConfig,
    Turns,
    UpdateSession,
    error_event,
    parse_client_event,
    session_event,
)
from hub.gateway.sockets import ClientGone, authorization, close, end_session, send_json
from hub.gateway.state import Gateway

log = logging.getLogger("hub.gateway")

router = APIRouter()

SUBPROTOCOL = "realtime"  # what OpenAI's browser example offers; chosen when offered
KEY_SUBPROTOCOL = "openai-insecure-api-key."  # a browser's API key, as a subprotocol (it cannot set headers)
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
OUTBOX_EVENTS = 64  # server events waiting for a slow client; while full, nothing more is read from it


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket) -> None:
    gateway: Gateway = websocket.app.state.gateway
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)  # so that a refusal can say why
    gateway.metrics.websockets.inc()
    slot = None
    try:
        gateway.keys.check(_authorization(websocket, offered))
        intent = websocket.query_params.get("intent")
        if intent not in (None, "transcription"):
            raise ApiError(
                "BAD_REQUEST",
                f"intent must be 'transcription': this gateway serves transcription sessions only, got {intent!r}",
                "intent",
            )
        slot = gateway.admit()
        config = SessionConfig(model=websocket.query_params.get("model") or DEFAULT_MODEL)
        await Connection(websocket, gateway, config, _dialect(websocket, offered)).run()
    except (ApiError, HubError) as exc:
        await _refuse(websocket, exc)
    except ClientGone:
        log.debug("a realtime client went away")
    finally:
        if slot is not None:
            slot.release()
        gateway.metrics.websockets.dec()


class Outbox:
    """Server events on their way to the client: at most ``size`` wait; ``put`` waits for room, ``room``
    until there is some."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._events: deque[dict[str, Any]] = deque()
        self._changed = asyncio.Condition()

    async def put(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self._events) < self.size)
                self._events.append(event)
                self._changed.notify_all()

    async def room(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._events) < self.size)

    async def get(self) -> dict[str, Any]:
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._events))
            event = self._events.popleft()
            self._changed.notify_all()
            return event


class Connection:
    """One Realtime connection: its configuration, its hub session (at most one at a time) and its four tasks."""

    def __init__(self, websocket: WebSocket, gateway: Gateway, config: SessionConfig, dialect: Dialect) -> None:
        self.websocket, self.gateway, self.dialect = websocket, gateway, dialect
        self.id = _new_id("sess")
        self.config = config  # as the client's updates left it (``receive`` merges each into it)
        self.applied = config  # as ``feed`` has carried it out: what the next hub session opens with
        self.turns = Turns(lambda: _new_id("item"), manual=config.turn_detection is None)
        self.outbox = Outbox(OUTBOX_EVENTS)
        self.commands: asyncio.Queue[ClientEvent] = asyncio.Queue(QUEUE_PIECES)
        self.session: AsyncStreamSession | None = None
        self.forwarder: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serve the connection until the client leaves (``ClientGone``); the hub session is closed after."""
        await self.outbox.put([session_event("created", self.config, self.id, self.dialect)])
        tasks = [asyncio.create_task(work()) for work in (self.receive, self.feed, self.send)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.session is not None:
                await end_session(self.session)
            if self.forwarder is not None:
                self.forwarder.cancel()
                await asyncio.gather(self.forwarder, return_exceptions=True)

    async def receive(self) -> None:
        """Client events, checked, into the command queue; a bad one is answered with an ``error`` at once."""
        while True:
            await self.outbox.room()
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise ClientGone
            text = message.get("text")
            try:
                if text is None:
                    raise Problem(
                        ErrorCode.INVALID_EVENT,
                        "binary frames are not part of the Realtime API: send JSON events as text",
                    )
                event = parse_client_event(text, self.config)
            except Problem as problem:
                await self.outbox.put([error_event(problem)])
                continue
            if isinstance(event, UpdateSession):
                self.config = event.config
            if isinstance(event, AppendAudio):
                for start in range(0, len(event.pcm), PIECE_BYTES):
                    await self.commands.put(AppendAudio(event.pcm[start : start + PIECE_BYTES], event.event_id))
            else:
                await self.commands.put(event)

    async def feed(self) -> None:
        """Carry out the client's events in order: audio to the hub session, commits, clears, updates."""
        while True:
            event = await self.commands.get()
            if isinstance(event, AppendAudio):
                await self._append(event)
            elif isinstance(event, CommitBuffer):
                try:
                    committed = self.turns.commit()
                except Problem as problem:
                    problem.event_id = event.event_id
                    await self.outbox.put([error_event(problem)])
                    continue
                await self.outbox.put(committed)
                await self._finish()
            elif isinstance(event, ClearBuffer):
                await self.outbox.put(self.turns.clear())
                await self._finish()
            else:
                await self._update(event)

    async def send(self) -> None:
        while True:
            event = await self.outbox.get()
            await send_json(self.websocket, {"event_id": _new_id("event"), **event})

    async def _append(self, event: AppendAudio) -> None:
        if self.forwarder is not None and self.forwarder.done():  # the hub ended the session on its own
            await self._finish()
        if self.session is None:
            try:
                await self._open()
            except HubError as exc:  # a busy pool, an unknown model ...: this audio is lost, the next tries again
                await self.outbox.put([error_event(Problem.of(exc, event.event_id))])
                return
        assert self.session is not None
        try:
            await self.session.send(event.pcm, RATE)
        except HubError:
            return  # the session is over: its forwarder tells the client why
        await self.outbox.put(self.turns.appended(len(event.pcm) // 2))

    async def _update(self, event: UpdateSession) -> None:
        """A new configuration: a hub session opened with another model, language, prompt or turn detection
        ends first (its audio committed, unless there is too little of it to commit)."""
        if event.config.hub_fields != self.applied.hub_fields:
            await self._finish()
        self.applied = event.config
        self.turns.manual = event.config.turn_detection is None
        await self.outbox.put([session_event("updated", event.config, self.id, event.dialect)])

    async def _open(self) -> None:
        config = self.applied
        options: dict[str, Any] = {"initial_prompt": config.prompt} if config.prompt else {}
        if config.turn_detection is not None:
            options["turn_detection"] = config.turn_detection.hub_turns()
        opening = asyncio.ensure_future(
            self.gateway.client.open_stream(
                self.gateway.provider_for(config.model),
                language=config.language,
                timeout=self.gateway.settings.section.request_timeout,
                **options,
            )
        )
        try:
            self.session = session = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the client left while the hub was placing the session
            opening.add_done_callback(_end_late)
            raise
        self.turns.session_opened()
        self.forwarder = asyncio.create_task(self._forward(session))

    async def _finish(self) -> None:
        """End the hub session (the worker decodes what is left) and wait until all its events are out."""
        if self.session is None:
            return
        await end_session(self.session)
        assert self.forwarder is not None
        await self.forwarder
        self.session = self.forwarder = None

    async def _forward(self, session: AsyncStreamSession) -> None:
        problem = None
        try:
            async for event in session.results():
                await self.outbox.put(self.turns.hub_event(event))
        except HubError as exc:
            if mapping(exc.code).close == 1011:
                log.warning("realtime session failed: %s %s", exc.code, exc.message)
            problem = Problem.of(exc)
            await self.outbox.put([error_event(problem)])
        await self.outbox.put(self.turns.session_ended(problem))


def _authorization(websocket: WebSocket, offered: list[str]) -> str | None:
    """The key from an ``openai-insecure-api-key.KEY`` subprotocol, else where ``/v1/stream`` looks for it."""
    for protocol in offered:
        if protocol.startswith(KEY_SUBPROTOCOL):
            return f"Bearer {protocol[len(KEY_SUBPROTOCOL) :]}"
    return authorization(websocket)


def _dialect(websocket: WebSocket, offered: list[str]) -> Dialect:
    """Beta for a client that asks for it (``OpenAI-Beta: realtime=v1`` or its subprotocol): its first event is
    ``transcription_session.created``; GA otherwise. Updates are read in either shape whatever this says."""
    beta = "realtime=v1" in websocket.headers.get("openai-beta", "") or BETA_SUBPROTOCOL in offered
    return Dialect.BETA if beta else Dialect.GA


async def _refuse(websocket: WebSocket, exc: ApiError | HubError) -> None:
    """A refusal before the session starts (key, intent, too many connections): the error event, then the close."""
    if mapping(exc.code).close == 1011:
        log.warning("realtime connection failed: %s %s", exc.code, exc.message)
    try:
        await send_json(websocket, {"event_id": _new_id("event"), **error_event(Problem.of(exc))})
    except ClientGone:
        return
    await close(websocket, mapping(exc.code).close, exc.message)


_late: set[asyncio.Task[None]] = set()  # closes of sessions opened for clients that had left


def _end_late(opening: asyncio.Future[AsyncStreamSession]) -> None:
    """A session the hub opened after its client left is closed at once, not left to its idle timeout."""
    if opening.cancelled() or opening.exception() is not None:
        return
    task = asyncio.ensure_future(end_session(opening.result()))
    _late.add(task)
    task.add_done_callback(_late.discard)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"
