"""The scaling decision as a pure function: a snapshot and a clock reading in, a target out.

No processes, no sockets: the supervisor builds a ``PoolSnapshot``, calls ``decide`` and
carries out the difference. Tested with made-up snapshots and times.
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.config import PoolConfig


@dataclass(frozen=True)
class PoolSnapshot:
    """What the policy needs to know of one provider's pool at one instant."""

    live: int  # starting + idle + busy
    starting: int
    queued: int
    idle_since: tuple[tuple[str, float], ...]  # (worker id, idle since), least recently used first


@dataclass(frozen=True)
class ScaleDecision:
    spawn: int  # workers to start now
    retire: tuple[str, ...]  # idle workers to stop now
    held_back: str  # why the pool did not grow as far as demand asked, or ""


def decide(snap: PoolSnapshot, pool: PoolConfig, now: float) -> ScaleDecision:
    """Grow while jobs wait for more workers than are starting; shrink idle workers past ``idle_timeout``.

    Never below ``min_size``, never above ``max_size``. Growth is immediate (a waiting job
    is a user waiting); shrinking waits out ``idle_timeout`` per worker, which is the
    hysteresis that keeps a bursty load from making the pool flap.
    """
    spawn = max(0, pool.min_size - snap.live)
    unserved = snap.queued - snap.starting - spawn
    held_back = ""
    if unserved > 0:
        room = pool.max_size - snap.live - spawn
        if unserved > room:
            held_back = f"{unserved} waiting job(s) want more workers but the pool is at max_size ({pool.max_size})"
        spawn += max(0, min(unserved, room))
    retire: list[str] = []
    if snap.queued == 0:
        surplus = snap.live - pool.min_size
        for worker_id, idle_since in snap.idle_since:
            if len(retire) >= surplus:
                break
            if now - idle_since >= pool.idle_timeout:
                retire.append(worker_id)
    return ScaleDecision(spawn=spawn, retire=tuple(retire), held_back=held_back)
