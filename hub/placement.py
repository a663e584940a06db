"""Where a live session or a one-shot job goes when a pool's workers also hold sessions: pure functions.

A session is state, not a lease: a worker serves up to ``pool.sessions_per_worker`` of them
and takes turns between them (``workers.turns``). The supervisor places a new session on the
worker with the least measured session load (its decode duty, with ``FRESH_DUTY`` for each session
it holds that no heartbeat has measured yet), not the fewest sessions: with VAD a silent session
costs nothing and a talking one a lot. It gives one-shot jobs to workers without sessions first;
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
# The duty a session placed since the worker's last heartbeat counts for (a tiny.en decode of ~0.5 s once a
# second on a CPU core, as it starts talking): sessions opened together spread instead of all going to the
# worker whose duty was lowest before any of them decoded.
FRESH_DUTY = 0.5


@dataclass(frozen=True)
class WorkerLoad:
    """One ready worker, as placement sees it."""

    id: str
    sessions: int
    job: bool  # a one-shot job or health check is on it now
    duty: float  # fraction of the last heartbeat interval it spent decoding its sessions
    fresh: int = 0  # sessions it holds that no heartbeat has measured yet

    @property
    def load(self) -> float:
        """Its measured session duty, and an estimate for the sessions not measured yet."""
        return self.duty + FRESH_DUTY * self.fresh


def session_home(workers: Sequence[WorkerLoad], per_worker: int) -> str | None:
    """The worker with the least session load that has room (the lowest ``load``, then no job, then the
    fewest sessions), or None when every one is full."""
    room = [w for w in workers if w.sessions < per_worker]
    return min(room, key=lambda w: (round(w.load, 2), w.job, w.sessions)).id if room else None


def one_shot_home(workers: Sequence[WorkerLoad], pool: PoolConfig) -> str | None:
    """A worker holding sessions that has time for a one-shot job, or None (the job waits for a free worker).

    Only workers without a job, with sessions, whose duty is below ``ONE_SHOT_DUTY``; the least busy first.
    Never with ``pool.enabled: false``: one worker, one job at a time, a session included."""
    if not pool.enabled:
        return None
    fits = [w for w in workers if w.sessions and not w.job and w.duty < ONE_SHOT_DUTY]
    return min(fits, key=lambda w: (w.duty, w.sessions)).id if fits else None
