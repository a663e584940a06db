"""uvicorn's HTTP and WebSocket protocols under ``hub.connections``'s limits: a header deadline and a connection cap.

uvicorn itself times out only an idle kept-alive connection; a client that opens a connection and sends half
a request line is held for ever. These subclasses report each connection to one ``ConnectionGuard`` (keyed by
its transport, which a WebSocket upgrade keeps) and close what it names: a connection whose headers are late
gets 408, one refused at the cap gets 503 with ``Retry-After``. ``sweep`` closes the overdue ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from hub.connections import REFUSED_REPLY, TIMEOUT_REPLY, ConnectionGuard, ConnectionLimits

Guard = ConnectionGuard[asyncio.BaseTransport]


def _close(transport: asyncio.BaseTransport, reply: bytes) -> None:
    if not transport.is_closing():
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(reply)
        transport.close()


def protocols(limits: ConnectionLimits) -> tuple[Guard, type[asyncio.Protocol], type[asyncio.Protocol]]:
    """A guard and the HTTP and WebSocket protocol classes that answer to it (for ``uvicorn.Config(http=, ws=)``)."""
    guard: Guard = ConnectionGuard(limits)

    class GuardedHTTP(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        _request: object = None  # the request cycle whose headers were last seen complete

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            admission = guard.opened(transport, time.monotonic())
            if admission.evicted is not None:
                _close(admission.evicted, TIMEOUT_REPLY)  # type: ignore[arg-type]
            if not admission.admitted:
                _close(transport, REFUSED_REPLY)

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                guard.waiting(
                    self.transport, time.monotonic()
                )  # the first bytes of a kept-alive connection's next request
            super().data_received(data)
            upgraded = self.transport.get_protocol() is not self
            if upgraded or (self.cycle is not None and self.cycle is not self._request):
                self._request = self.cycle
                guard.done(self.transport)

        def connection_lost(self, exc: Exception | None) -> None:
            guard.closed(self.transport)
            super().connection_lost(exc)

    class GuardedWebSocket(WebSocketsSansIOProtocol):  # after an upgrade, the same transport's end is reported here
        def connection_lost(self, exc: Exception | None) -> None:
            guard.closed(self.transport)
            super().connection_lost(exc)

    return guard, GuardedHTTP, GuardedWebSocket


async def sweep(guard: Guard) -> None:
    """Close, for ever, the connections whose headers are late (run it as a task beside the server)."""
    while True:
        await asyncio.sleep(guard.limits.sweep_interval)
        for transport in guard.overdue(time.monotonic()):
            _close(transport, TIMEOUT_REPLY)
