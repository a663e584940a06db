"""Where a live session or a one-shot job goes when the idle queue has no worker for it: pure functions.

A session is state, not a lease: a worker serves up to ``pool.sessions_per_worker`` of them
and takes turns between them (``workers.turns``). The supervisor places a new session on the
worker with the least measured session load (its decode duty, with ``FRESH_DUTY`` for each session
it holds that no heartbeat has measured yet), not the fewest sessions: with VAD a silent session
costs nothing and a talking one a lot. A one-shot job goes to the least recently used idle worker
first (the pool's idle queue); failing that, to a worker that still has room: one holding fewer
than ``pool.max_batch`` jobs, which it decodes together in one forward pass. A worker with sessions
takes one only when its sessions leave it the time (its measured decode duty below
``ONE_SHOT_DUTY``), since the job's decode delays every session's next turn on it.
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
    jobs: int  # one-shot jobs and health checks it holds now
    duty: float  # fraction of the last heartbeat interval it spent decoding its sessions
    fresh: int = 0  # sessions it holds that no heartbeat has measured yet

    @property
    def load(self) -> float:
        """Its measured session duty, and an estimate for the sessions not measured yet."""
        return self.duty + FRESH_DUTY * self.fresh


def session_home(workers: Sequence[WorkerLoad], per_worker: int) -> str | None:
    """The worker with the least session load that has room (the lowest ``load``, then the fewest jobs, then
    the fewest sessions), or None when every one is full."""
    room = [w for w in workers if w.sessions < per_worker]
    return min(room, key=lambda w: (round(w.load, 2), w.jobs, w.sessions)).id if room else None


def one_shot_home(workers: Sequence[WorkerLoad], pool: PoolConfig) -> str | None:
    """A busy worker with room for one more one-shot job, or None (the job waits for a free worker).

    Only busy workers (free ones are the idle queue's, taken least recently used first). Room: fewer than
    ``pool.max_batch`` jobs held, and sessions (if any) whose duty is below ``ONE_SHOT_DUTY``. By load: workers
    without sessions first, then the fewest jobs held (the batch that starts soonest), then the lowest duty and
    fewest sessions; ties keep the order given (the pool's). Never with ``pool.enabled: false``: one worker, one
    job at a time, a session included."""
    if not pool.enabled:
        return None
    busy = [w for w in workers if w.jobs or w.sessions]  # a worker with neither is in the idle queue
    fits = [w for w in busy if w.jobs < pool.max_batch and (not w.sessions or w.duty < ONE_SHOT_DUTY)]
    return min(fits, key=lambda w: (w.sessions > 0, w.jobs, w.duty, w.sessions)).id if fits else None
