"""The FastAPI application: the routers, the error handlers, health, metrics and the page."""

from __future__ import annotations

import logging
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from hub import __version__
from hub.errors import HubError
from hub.gateway import live, openai_api, realtime
from hub.gateway.errors import ApiError, describe
from hub.gateway.state import Gateway

log = logging.getLogger("hub.gateway")


def create_app(gateway: Gateway) -> Measured:
    app = FastAPI(title="ASR Hub gateway", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway
    app.include_router(openai_api.router)
    app.include_router(live.router)
    app.include_router(realtime.router)
    app.add_exception_handler(ApiError, _error)
    app.add_exception_handler(HubError, _error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("hub.gateway").joinpath("static/index.html").read_text())

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        if gateway.hub_ready:
            return Response("ready\n", media_type="text/plain")
        return Response(f"not ready: {gateway.hub_problem}\n", status_code=503, media_type="text/plain")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Measured(app, gateway)


async def _error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, (ApiError, HubError))
    status, body, headers = describe(exc)
    if status >= 500 and status != 503:  # 503s (draining, busy) are the hub's own news, logged there
        log.warning("request failed: %s %s", exc.code, exc.message)
    return JSONResponse(body, status_code=status, headers=headers)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 for an unknown path, 405 ...) in OpenAI's error shape too."""
    assert isinstance(exc, HTTPException)
    body = {"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    return await _error(_request, ApiError("BAD_REQUEST", f"invalid request: {exc}"))


class Measured:
    """ASGI middleware: count every HTTP answer by route template and status, and time it."""

    def __init__(self, app: FastAPI, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.gateway.metrics.observe(route, status, time.monotonic() - started)
