"""One table from the hub's error codes to what each protocol says: an HTTP status and an OpenAI
error type, a WebSocket close code. Every error a client of the gateway sees goes through here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.errors import HubError


@dataclass(frozen=True)
class Mapping:
    status: int
    type: str  # OpenAI's error "type"
    close: int  # WebSocket close code (1008 policy, 1011 server error, 1013 try again later)


_TABLE: dict[str, Mapping] = {
    "INVALID_AUDIO": Mapping(400, "invalid_request_error", 1007),
    "BAD_REQUEST": Mapping(400, "invalid_request_error", 1008),
    "UNSUPPORTED_DATA": Mapping(415, "invalid_request_error", 1003),  # e.g. binary frames before the config
    "CLIENT_CLOSED": Mapping(499, "invalid_request_error", 1000),
    "UNAUTHORIZED": Mapping(401, "invalid_request_error", 1008),
    "UNKNOWN_PROVIDER": Mapping(404, "invalid_request_error", 1008),
    "UPLOAD_TOO_LARGE": Mapping(413, "invalid_request_error", 1009),
    "IDLE_TIMEOUT": Mapping(408, "invalid_request_error", 1001),
    "POOL_BUSY": Mapping(429, "rate_limit_error", 1013),
    "TOO_MANY_REQUESTS": Mapping(429, "rate_limit_error", 1013),
    "PROVIDER_UNAVAILABLE": Mapping(503, "server_error", 1013),
    "SHUTTING_DOWN": Mapping(503, "server_error", 1012),
    "ACQUIRE_TIMEOUT": Mapping(503, "server_error", 1013),
    "JOB_TIMEOUT": Mapping(504, "server_error", 1011),
    "HUB_UNREACHABLE": Mapping(502, "server_error", 1013),
    "AUTH_FAILED": Mapping(502, "server_error", 1011),  # the hub refused the gateway's own CURVE key
    "WORKER_CRASHED": Mapping(502, "server_error", 1011),
    "INFERENCE_FAILED": Mapping(500, "server_error", 1011),
    "INTERNAL_ERROR": Mapping(500, "server_error", 1011),
}
_DEFAULT = Mapping(500, "server_error", 1011)
RETRY_AFTER_SECONDS = 1  # what a 429 or a busy 503 tells the client to wait


class ApiError(Exception):
    """An error the gateway itself raises (auth, limits, form fields); same shape as a hub error."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def mapping(code: str) -> Mapping:
    return _TABLE.get(code, _DEFAULT)


def describe(exc: HubError | ApiError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The HTTP status, OpenAI's error body and the headers for ``exc``."""
    entry = mapping(exc.code)
    body = {
        "error": {
            "message": exc.message,
            "type": entry.type,
            "param": getattr(exc, "param", None),
            "code": exc.code.lower(),
        }
    }
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if entry.status in (429, 503) else {}
    return entry.status, body, headers


def ws_event(exc: HubError | ApiError) -> dict[str, Any]:
    """The JSON error event a WebSocket or Wyoming client receives before the close."""
    return {"type": "error", "code": exc.code, "message": exc.message}
