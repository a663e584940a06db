"""Progress lines on stderr, stamped with the seconds since the benchmark started, so a long run
shows where it is and the printed table on stdout stays clean."""

from __future__ import annotations

import sys
import time

_STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def elapsed() -> float:
    """Seconds since the benchmark started."""
    return time.monotonic() - _STARTED
