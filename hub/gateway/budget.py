"""The gateway's memory budget for audio in flight: uploads as they are read, plus the PCM they decode to.

An upload reserves its size (from Content-Length, before its body is read; a chunked one as it is read) plus
the PCM it is expected to decode to (``hub.audio.upload_peak_bytes``), and waits, in arrival order, while that does not fit
(``gateway.max_buffered_mb``); past ``gateway.max_buffer_wait`` it is refused with 429 and ``Retry-After``.
Once decoded, its upload is dropped and the reservation becomes its PCM's real size; the answer frees it.
A compressed file can decode to more than expected: its reservation then grows past the budget (by at most
the PCM of ``hub.max_audio_seconds``), and later uploads wait for it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from hub.gateway.errors import ApiError


class MemoryBudget:
    """Bytes reserved against ``limit``; waiters are served first come, first served."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self.reserved = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def reservation(self) -> Reservation:
        return Reservation(self)

    async def _take(self, nbytes: int, deadline: float) -> None:
        if not self._waiters and self.reserved + nbytes <= self.limit:
            self._add(nbytes)
            return
        if nbytes > self.limit:
            raise ApiError(
                "UPLOAD_TOO_LARGE",
                f"the upload needs {nbytes / 2**20:.0f} MB, more than gateway.max_buffered_mb",
                "file",
            )
        waiter = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(
                "TOO_MANY_REQUESTS",
                f"the gateway holds {self.reserved / 2**20:.0f} MB of audio in flight, its limit (gateway.max_buffered_mb); "
                "retry shortly",
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give(nbytes)  # granted just as the wait was cancelled (the client went away)
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _add(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)

    def _give(self, nbytes: int) -> None:
        self.reserved -= nbytes
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            nbytes, waiter = self._waiters[0]
            if waiter.done():  # timed out or cancelled meanwhile
                self._waiters.popleft()
                continue
            if self.reserved + nbytes > self.limit:
                return
            self._waiters.popleft()
            self._add(nbytes)
            waiter.set_result(None)


class Reservation:
    """One upload's share of the budget; ``release`` (once, however often it is called) gives it all back."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0
        self._deadline = time.monotonic() + budget.wait

    async def grow_to(self, nbytes: int) -> None:
        """Hold ``nbytes`` in all, waiting for room (429 past the budget's wait, counted from the first call)."""
        if nbytes > self.held:
            await self.budget._take(nbytes - self.held, self._deadline)
            self.held = nbytes

    def settle(self, nbytes: int) -> None:
        """What the upload really holds now (its PCM, once the upload itself is dropped), room or not."""
        if nbytes >= self.held:
            self.budget._add(nbytes - self.held)
        else:
            self.budget._give(self.held - nbytes)
        self.held = nbytes

    def release(self) -> None:
        self.settle(0)
