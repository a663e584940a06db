"""The scaling decision as a pure function: a snapshot and a clock reading in, a decision out.

No processes, no sockets: the supervisor builds a ``PoolSnapshot``, calls ``decide`` and
carries out the difference. Tested with made-up snapshots and times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hub.config import PoolConfig


@dataclass(frozen=True)
class PoolSnapshot:
    """What the policy needs to know of one provider's pool at one instant."""

    live: int  # starting + idle + busy
    starting: int
    queued: int
    idle_since: tuple[tuple[str, float], ...] = ()  # (worker id, idle since), least recently used first
    floor: int = 0  # the size set at run time (scale, SIGTTIN/SIGTTOU); min_size applies when lower
    memory_mb: float = 0.0  # summed RSS of the live workers
    worker_mb: float = 0.0  # RSS one more worker is expected to take (0: not known yet)
    sessions: int = 0  # live sessions on the pool's workers


@dataclass(frozen=True)
class ScaleDecision:
    spawn: int  # workers to start now
    retire: tuple[str, ...]  # idle workers to stop now
    held_back: str  # why the pool did not grow as far as demand asked, or ""


def floor_size(snap: PoolSnapshot, pool: PoolConfig) -> int:
    """The size kept whatever the queue: ``min_size`` or the size set at run time, and, while sessions are
    live, the workers their load needs (``sessions_per_worker`` each) plus one free for one-shot jobs."""
    for_sessions = math.ceil(snap.sessions / pool.sessions_per_worker) + 1 if snap.sessions else 0
    return min(pool.max_size, max(pool.min_size, snap.floor, for_sessions))


def decide(snap: PoolSnapshot, pool: PoolConfig, now: float) -> ScaleDecision:
    """Grow while jobs wait for more workers than are starting; shrink idle workers past ``idle_timeout``.

    The pool never goes below its floor (``min_size``, or the size set at run time) and
    never grows above ``max_size`` or ``pool.max_memory_mb``. GPU memory is not decided here but
    per worker, where it is placed (``hub.gpus.place``): it needs to know which card a worker gets.
    Growth is immediate (a waiting job is a user waiting); shrinking waits out
    ``idle_timeout`` per worker, the hysteresis that keeps a bursty load from flapping.
    """
    floor = floor_size(snap, pool)
    spawn = max(0, floor - snap.live)
    unserved = snap.queued - snap.starting - spawn
    held_back = ""
    if unserved > 0:
        room = pool.max_size - snap.live - spawn
        limit, limit_why = _resource_room(snap, pool)
        grow = max(0, int(min(unserved, room, limit)))  # limit is math.inf without a memory cap
        if grow < unserved:
            held_back = (
                limit_why
                if limit < room
                else (f"{unserved} waiting job(s) want more workers but the pool is at max_size ({pool.max_size})")
            )
        spawn += grow
    retire: list[str] = []
    if snap.queued == 0:
        surplus = snap.live - floor
        for worker_id, idle_since in snap.idle_since:
            if len(retire) >= surplus:
                break
            if now - idle_since >= pool.idle_timeout or snap.live - len(retire) > pool.max_size:
                retire.append(worker_id)
    return ScaleDecision(spawn=spawn, retire=tuple(retire), held_back=held_back)


def _resource_room(snap: PoolSnapshot, pool: PoolConfig) -> tuple[float, str]:
    """How many more workers memory allows, and why that is the limit (or "")."""
    room, why = math.inf, ""
    if pool.max_memory_mb > 0 and snap.worker_mb > 0:
        fits = max(0, math.floor((pool.max_memory_mb - snap.memory_mb) / snap.worker_mb))
        if fits < room:
            room = fits
            why = (
                f"memory cap: workers use {snap.memory_mb:.0f} MiB of pool.max_memory_mb={pool.max_memory_mb:.0f}, "
                f"one more needs about {snap.worker_mb:.0f} MiB"
            )
    return room, why if room < math.inf else ""
