"""What the gateway's WebSocket endpoints (``/v1/stream``, ``/v1/realtime``) share: sending a JSON event,
closing with a reason, where the client's API key is, and ending a hub session whatever happened."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from hub.client import AsyncStreamSession
from hub.errors import HubError

CLOSE_TIMEOUT_S = 30.0  # how long a connection waits for its hub session to flush and close
MAX_REASON_BYTES = 123  # the most a WebSocket close reason may hold


class ClientGone(Exception):
    """The client disconnected: nobody is left to tell anything."""


def authorization(websocket: WebSocket) -> str | None:
    """The Authorization header, or (browsers cannot set headers on a WebSocket) the ``api_key`` query parameter."""
    key = websocket.query_params.get("api_key")
    return f"Bearer {key}" if key else websocket.headers.get("authorization")


async def send_json(websocket: WebSocket, body: dict[str, Any]) -> None:
    try:
        await websocket.send_text(json.dumps(body))
    except (WebSocketDisconnect, RuntimeError, OSError):
        raise ClientGone from None


async def close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with ``reason`` cut to what a close frame can carry (123 bytes of UTF-8, never inside a character)."""
    try:
        await websocket.close(code, reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client is gone already


async def end_session(session: AsyncStreamSession) -> None:
    """Close the hub session whatever happened, so that its worker is free again at once."""
    try:
        await asyncio.wait_for(session.close(), CLOSE_TIMEOUT_S)
    except (HubError, asyncio.TimeoutError):
        pass
