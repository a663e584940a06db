"""Where a live session or a one-shot job goes when a pool's workers also hold sessions: pure functions.

A session is state, not a lease: a worker serves up to ``pool.sessions_per_worker`` of them
and takes turns between them (``workers.turns``). The supervisor places a new session on the
worker with the least session load, and gives one-shot jobs to workers without sessions first;
a worker with sessions takes one only when its sessions leave it the time (its measured decode
duty below ``ONE_SHOT_DUTY``), since the job's decode delays every session's next turn on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hub.config import PoolConfig

# A worker whose sessions keep it decoding more than this fraction of the time takes no one-shot job:
# its sessions need the rest to catch up after the job (whose decode delays each of their next turns).
ONE_SHOT_DUTY = 0.5


@dataclass(frozen=True)
class WorkerLoad:
    """One ready worker, as placement sees it."""

    id: str
    sessions: int
    job: bool  # a one-shot job or health check is on it now
    duty: float  # fraction of the last heartbeat interval it spent decoding its sessions


def session_home(workers: Sequence[WorkerLoad], per_worker: int) -> str | None:
    """The worker with the least session load that has room (fewest sessions, then no job, then the
    lowest duty), or None when every one is full."""
    room = [w for w in workers if w.sessions < per_worker]
    return min(room, key=lambda w: (w.sessions, w.job, w.duty)).id if room else None


def one_shot_home(workers: Sequence[WorkerLoad], pool: PoolConfig) -> str | None:
    """A worker holding sessions that has time for a one-shot job, or None (the job waits for a free worker).

    Only workers without a job, with sessions, whose duty is below ``ONE_SHOT_DUTY``; the least busy first.
    Never with ``pool.enabled: false``: one worker, one job at a time, a session included."""
    if not pool.enabled:
        return None
    fits = [w for w in workers if w.sessions and not w.job and w.duty < ONE_SHOT_DUTY]
    return min(fits, key=lambda w: (w.duty, w.sessions)).id if fits else None
