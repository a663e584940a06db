"""Typed errors shared by the supervisor, the workers and the clients.

Every error carries a stable ``code`` and a message a person can act on. Errors cross
process boundaries as plain dicts (``to_dict`` / ``from_dict``), so a client re-raises
the very class that the worker or the supervisor raised, with its message and request id.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HubError(Exception):
    """Base class of every error the hub reports. ``code`` is stable; messages may change.

    ``request_id`` is the id of the client's request that failed (on the wire its key is ``job_id``,
    kept for compatibility; it holds the request id)."""

    code: ClassVar[str] = "HUB_ERROR"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "job_id": self.request_id}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> HubError:
        """Rebuild the error a peer sent; an unknown code still becomes a ``HubError``."""
        code = str(data.get("code", HubError.code))
        cls = ERROR_CLASSES.get(code)
        message = str(data.get("message", "unknown error"))
        request_id = data.get("job_id")
        if cls is None:
            err = HubError(message, request_id=request_id)
            err.code = code  # type: ignore[misc]  # keep a newer peer's code visible
            return err
        return cls(message, request_id=request_id)


class PoolBusy(HubError):
    """The provider's queue is full; retry later or raise ``pool.max_queue``."""

    code = "POOL_BUSY"


class AcquireTimeout(HubError):
    """No worker became free within ``pool.acquire_timeout``."""

    code = "ACQUIRE_TIMEOUT"


class InvalidAudio(HubError):
    """The audio is unreadable, empty, non-finite, of a wrong type or a bad descriptor."""

    code = "INVALID_AUDIO"


class UnknownProvider(HubError):
    """The request named a provider the config does not define."""

    code = "UNKNOWN_PROVIDER"


class ProviderUnavailable(HubError):
    """The provider exists but has no worker that can serve (disabled, or its model fails to load)."""

    code = "PROVIDER_UNAVAILABLE"


class WorkerCrashed(HubError):
    """The worker running the job died before answering."""

    code = "WORKER_CRASHED"


class JobTimeout(HubError):
    """The job did not finish within its deadline."""

    code = "JOB_TIMEOUT"


class BadRequest(HubError):
    """The request is malformed: wrong frames, fields or options."""

    code = "BAD_REQUEST"


class ShuttingDown(HubError):
    """The supervisor is draining and takes no new jobs."""

    code = "SHUTTING_DOWN"


class HubUnreachable(HubError):
    """No supervisor answered at the endpoint."""

    code = "HUB_UNREACHABLE"


class AuthFailed(HubError):
    """The hub refused this client's CURVE key in the handshake (client side, from the socket's monitor)."""

    code = "AUTH_FAILED"


class InferenceFailed(HubError):
    """The model raised while transcribing."""

    code = "INFERENCE_FAILED"


class InternalError(HubError):
    """A bug in the hub; the supervisor logged the details and carries on."""

    code = "INTERNAL_ERROR"


ERROR_CLASSES: dict[str, type[HubError]] = {
    cls.code: cls
    for cls in (
        PoolBusy,
        AcquireTimeout,
        InvalidAudio,
        UnknownProvider,
        ProviderUnavailable,
        WorkerCrashed,
        JobTimeout,
        BadRequest,
        ShuttingDown,
        HubUnreachable,
        AuthFailed,
        InferenceFailed,
        InternalError,
    )
}
