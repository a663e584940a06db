"""A listener's limits on its connections: a deadline for each request's headers and a cap on open connections.

Pure bookkeeping on a clock the caller passes; each server (the supervisor's probes, the gateway's HTTP and
Wyoming listeners) does its own I/O: it closes what ``overdue`` and ``opened`` name. A client that sends
half a request and then nothing costs a descriptor until the deadline, never longer; at the cap, a new
connection displaces the one that has waited longest for its headers, so a flood of such clients cannot
lock out a probe or a real request (which sends its headers at once). Only when every open connection is
busy with a request is a new one refused.
"""

from __future__ import annotations

import resource
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

REFUSED_REPLY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 41\r\n"
    b"Connection: close\r\n\r\ntoo many open connections; retry shortly\n"
)
TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 43\r\n"
    b"Connection: close\r\n\r\nthe request's headers did not arrive in time\n"
)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds from a connection's start (or its next request's first byte) to its blank line
    max_connections: int

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.max_connections < 1:
            raise ValueError(f"header_timeout must be > 0 and max_connections >= 1, got {self}")

    @property
    def sweep_interval(self) -> float:
        """How often a server looks for overdue connections: a tenth of the deadline, at most a second."""
        return min(1.0, self.header_timeout / 10)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    evicted: object | None = None  # a connection the new one displaced: close it


class ConnectionGuard(Generic[K]):
    """The open connections of one listener, and those of them waiting for a request's headers (oldest first)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._open: set[K] = set()
        self._waiting: dict[K, float] = {}  # key -> when it started waiting; insertion order is age order

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def opened(self, key: K, now: float) -> Admission:
        """A new connection: admitted (perhaps displacing the longest-waiting one) or refused at the cap."""
        evicted: K | None = None
        if len(self._open) >= self.limits.max_connections:
            if not self._waiting:
                return Admission(False)
            evicted = next(iter(self._waiting))
            self.closed(evicted)
        self._open.add(key)
        self._waiting[key] = now
        return Admission(True, evicted)

    def waiting(self, key: K, now: float) -> None:
        """A kept-alive connection began its next request: its headers are due within the deadline again."""
        if key in self._open and key not in self._waiting:
            self._waiting[key] = now

    def done(self, key: K) -> None:
        """The request's headers are complete (the body and the answer take what they take)."""
        self._waiting.pop(key, None)

    def closed(self, key: K) -> None:
        self._open.discard(key)
        self._waiting.pop(key, None)

    def overdue(self, now: float) -> list[K]:
        """The connections whose headers are late; they stay counted until the server reports them ``closed``."""
        late = []
        for key, since in self._waiting.items():
            if now - since < self.limits.header_timeout:
                break  # the rest started later
            late.append(key)
        for key in late:
            del self._waiting[key]
        return late


def fd_room(max_connections: int, reserve: int = 256) -> str | None:
    """Raise this process's descriptor limit to fit ``max_connections`` plus ``reserve`` if the hard limit
    allows; return a warning when it cannot, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + reserve
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target >= need:
        return None
    return (
        f"the descriptor limit (ulimit -n {target}) is below max_connections ({max_connections}) plus {reserve} "
        "for everything else: raise the limit or lower max_connections"
    )
