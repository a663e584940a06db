"""The supervisor's HTTP side: ``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (ready to serve).

One daemon thread runs an asyncio loop that serves every connection: a connection costs a descriptor and
no thread, so clients that send half a request cannot use up the supervisor's threads (a pod's pids limit)
or hold up the liveness probe (a kubelet would kill a healthy hub). Each request's headers must arrive
within ``limits.header_timeout`` and at most ``limits.max_connections`` are open (``hub.connections``);
every answer closes its connection.

It reads only ``Metrics``, which is lock-guarded, and the readiness flag and loop timestamp the supervisor
sets on every loop pass: ``/healthz`` answers 503 when the loop has stalled, not merely while the process
exists; ``/readyz`` answers 503 from the moment draining starts, so a pod leaves its Service before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from hub.connections import REFUSED_REPLY, TIMEOUT_REPLY, ConnectionGuard, ConnectionLimits
from hub.supervisor.metrics import Metrics, PrometheusCollector

STALL_SECONDS = 5.0  # the loop passes every 50 ms; this long without one means it is stuck
MAX_HEADER_BYTES = 16 * 1024
BACKLOG = 1024
DEFAULT_LIMITS = ConnectionLimits(header_timeout=10.0, max_connections=128)

Reply = tuple[str, str, bytes]  # status line, content type, body


class ProbeServer:
    """The listening socket and its loop thread; ``shutdown()`` closes every connection and stops the thread."""

    def __init__(self, metrics: Metrics, sock: socket.socket, limits: ConnectionLimits) -> None:
        self.metrics = metrics
        self.guard: ConnectionGuard[asyncio.StreamWriter] = ConnectionGuard(limits)
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(PrometheusCollector(metrics))
        self._sock = sock
        self._writers: set[asyncio.StreamWriter] = set()  # the open connections, aborted at shutdown
        self._loop = asyncio.new_event_loop()
        self._stopped = asyncio.Event()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._run(),), name="metrics-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join()
        self._loop.close()
        self._sock.close()

    async def _run(self) -> None:
        server = await asyncio.start_server(self._connection, sock=self._sock, limit=MAX_HEADER_BYTES, backlog=BACKLOG)
        sweep = asyncio.ensure_future(self._sweep())
        try:
            await self._stopped.wait()
        finally:
            sweep.cancel()
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await server.wait_closed()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.guard.limits.sweep_interval)
            for writer in self.guard.overdue(time.monotonic()):
                _close(writer, TIMEOUT_REPLY)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admission = self.guard.opened(writer, time.monotonic())
        if admission.evicted is not None:
            _close(admission.evicted, TIMEOUT_REPLY)  # type: ignore[arg-type]
        if not admission.admitted:
            _close(writer, REFUSED_REPLY)
            return
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.guard.done(writer)
            status, content_type, body = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            # a client that does not read its answer is cut off after the same deadline as its headers
            await asyncio.wait_for(writer.drain(), self.guard.limits.header_timeout)
        except asyncio.LimitOverrunError:
            writer.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # closed by the client, by the deadline, or displaced
        finally:
            self.guard.closed(writer)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> Reply:
        request_line, _, header_block = head.decode("latin-1").partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[0] != "GET":
            return "405 Method Not Allowed", "text/plain; charset=utf-8", b"GET /metrics, /healthz or /readyz\n"
        target = urlsplit(parts[1])
        if target.path == "/healthz":
            stalled = time.monotonic() - self.metrics.loop_at
            if stalled < STALL_SECONDS:
                return _text("200 OK", "ok\n")
            return _text("503 Service Unavailable", f"the supervisor's loop has not run for {stalled:.0f} s\n")
        if target.path == "/readyz":
            if self.metrics.ready:
                return _text("200 OK", "ready\n")
            return _text(
                "503 Service Unavailable", "not ready: draining, or a provider has fewer than min_size ready workers\n"
            )
        if target.path == "/metrics":
            accept = next(
                (
                    line.partition(":")[2].strip()
                    for line in header_block.split("\r\n")
                    if line.lower().startswith("accept:")
                ),
                "",
            )
            encoder, content_type = choose_encoder(accept)
            names = parse_qs(target.query).get("name[]")
            registry = self.registry.restricted_registry(names) if names else self.registry
            return "200 OK", content_type, encoder(registry)
        return _text("404 Not Found", "try /metrics, /healthz or /readyz\n")


def _text(status: str, body: str) -> Reply:
    return status, "text/plain; charset=utf-8", body.encode()


def _close(writer: asyncio.StreamWriter, reply: bytes) -> None:
    """Say why (best effort: the client may not be reading) and close; the handler then finds its read ended."""
    if not writer.is_closing():
        writer.write(reply)
        writer.close()


def serve(metrics: Metrics, host: str, port: int, limits: ConnectionLimits = DEFAULT_LIMITS) -> ProbeServer:
    """Bind now (an address in use fails here, in the caller) and serve on a daemon thread until ``shutdown()``."""
    sock = socket.create_server((host, port), backlog=BACKLOG)
    server = ProbeServer(metrics, sock, limits)
    server.start()
    return server
