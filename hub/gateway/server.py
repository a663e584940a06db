"""Run the gateway: uvicorn for HTTP and WebSocket, the Wyoming server beside it, one event loop.

SIGTERM and SIGINT stop it gracefully (uvicorn finishes the requests in flight); SIGHUP reloads the
API keys file. Started by the supervisor, it also stops when the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvicorn

from hub.connections import ConnectionLimits, fd_room
from hub.gateway import guard, wyoming_asr
from hub.gateway.app import create_app
from hub.gateway.state import Gateway, Settings

log = logging.getLogger("hub.gateway")

PARENT_CHECK_INTERVAL = 1.0
MAX_WS_MESSAGE_BYTES = 4 * 1024 * 1024  # one binary audio frame; a second of 48 kHz float32 is 192 KB


async def serve(settings: Settings, parent_pid: int | None = None) -> int:
    section = settings.section
    gateway = Gateway(settings)
    limits = ConnectionLimits(section.header_timeout, section.max_connections)
    connections, http_protocol, ws_protocol = guard.protocols(limits)
    if warning := fd_room(2 * section.max_connections):  # HTTP and Wyoming each hold up to max_connections
        log.warning("%s", warning)
    config = uvicorn.Config(
        create_app(gateway),
        host=section.host,
        port=section.port,
        log_config=None,
        access_log=False,
        lifespan="off",
        http=http_protocol,
        ws=ws_protocol,
        ws_max_size=MAX_WS_MESSAGE_BYTES,
        ws_per_message_deflate=False,  # compressed audio frames would unpack unbounded: one read, many messages
        timeout_graceful_shutdown=max(1, int(section.request_timeout)),
    )
    server = uvicorn.Server(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # uvicorn re-raises the signal that stopped it: let it pass
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, gateway.keys.reload)
    await gateway.start()
    try:
        wyoming = (
            await wyoming_asr.start(
                gateway,
                section.host,
                section.wyoming_port,
                idle_timeout=section.wyoming_idle_timeout,
                max_connections=section.max_connections,
            )
            if section.wyoming_port
            else None
        )
    except OSError as exc:
        log.error(
            "cannot serve Wyoming on %s:%d: %s (is another server on that port?)",
            section.host,
            section.wyoming_port,
            exc.strerror,
        )
        await gateway.stop()
        return 1
    watch = loop.create_task(_watch_parent(parent_pid, server)) if parent_pid else None
    overdue = loop.create_task(guard.sweep(connections))
    log.info(
        "gateway on http://%s:%d (OpenAI API, /v1/stream, /v1/realtime, page at /)%s, hub %s",
        section.host,
        section.port,
        f", Wyoming on tcp://{section.host}:{section.wyoming_port}" if wyoming else "",
        settings.where,
    )
    try:
        await server.serve()
    finally:
        if watch is not None:
            watch.cancel()
        overdue.cancel()
        if wyoming is not None:
            await wyoming.stop()
        await gateway.stop()
    log.info("gateway stopped")
    return 0 if server.started else 1


async def _watch_parent(parent_pid: int, server: uvicorn.Server) -> None:
    """A gateway whose supervisor died (even by SIGKILL) stops instead of lingering as an orphan."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_CHECK_INTERVAL)
    log.warning("the supervisor (pid %d) is gone: stopping", parent_pid)
    server.should_exit = True
