"""Worker handles, their states, and the least-recently-used queue of idle workers.

A handle's state changes only through ``ProviderPool.set_state``, which keeps the idle
queue in step (Ray Serve's ``ReplicaState`` discipline): a worker is in ``idle`` if and
only if its state is IDLE.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from hub.config import ProviderConfig
from hub.supervisor.gpus import Card
from hub.supervisor.process import Proc


class WorkerState(str, Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # finishing its job, then it stops
    UNHEALTHY = "unhealthy"  # being stopped: it crashed, hung or overran a job


@dataclass(frozen=True)
class SessionTurn:
    """One live session on a worker, as its heartbeats tell: seconds spent decoding it, its step interval now
    (stretched when the worker is overloaded), the fraction of the last heartbeat interval its decodes took."""

    busy: float
    step_s: float
    duty: float = 0.0


def session_turns(previous: dict[str, SessionTurn], reported: object, elapsed: float) -> dict[str, SessionTurn]:
    """A heartbeat's ``turns`` (``{session: {"busy", "step_s"}}``) with each session's duty since the last one;
    anything malformed is left out."""
    turns = {}
    for sid, turn in (reported if isinstance(reported, dict) else {}).items():
        busy, step = (turn.get("busy"), turn.get("step_s")) if isinstance(turn, dict) else (None, None)
        if not isinstance(busy, (int, float)) or not isinstance(step, (int, float)):
            continue
        before = previous[sid].busy if sid in previous else 0.0
        duty = max(0.0, float(busy) - before) / elapsed if elapsed > 0 else 0.0
        turns[str(sid)] = SessionTurn(busy=float(busy), step_s=float(step), duty=min(1.0, duty))
    return turns


@dataclass(eq=False)
class WorkerHandle:
    """The supervisor's view of one worker process."""

    id: str
    provider: str
    proc: Proc
    card: Card | None  # the GPU it was placed on; None: the CPU (or a GPU worker that fell back to it)
    started_at: float
    state: WorkerState = WorkerState.STARTING
    device: str = "pending"
    last_heartbeat: float = 0.0
    idle_since: float = 0.0
    jobs: list[str] = field(
        default_factory=list
    )  # the one-shot jobs (and health checks) it holds, up to pool.max_batch
    sessions: set[str] = field(default_factory=set)  # the live sessions it serves (job ids)
    busy: float = 0.0  # seconds it has spent decoding sessions, as its last heartbeat said
    duty: float = 0.0  # fraction of the last heartbeat interval spent decoding sessions
    turns: dict[str, SessionTurn] = field(default_factory=dict)  # each session's, by session (job) id
    jobs_done: int = 0
    kill_at: float | None = None  # SIGKILL after this time, once SIGTERM or STOP was sent
    last_error: str = ""
    generation: int = 0  # the config generation it was started with; SIGHUP bumps the pool's
    last_check: float = 0.0  # when its last health check (or its start) was
    consecutive_failures: int = 0
    rss_mb: float = 0.0
    slot: int = 0  # a replacement takes over its predecessor's slot ...
    restarts: int = 0  # ... and counts one more restart of it
    gpu_used_mb: float | None = None  # this process's own memory on its card (NVML, by pid)
    gpu_card_used_mb: float | None = None  # the whole card's, every tenant's
    gpu_card_total_mb: float | None = None
    gpu_utilization: float | None = None  # the card's
    gpu_error: str = ""  # why a reading is missing
    cuda_pci_bus_id: str = ""  # the card the worker's own CUDA runtime reports, from its READY

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def live(self) -> bool:
        """Counts toward the pool's size: not on its way out."""
        return self.state in (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)


@dataclass
class ProviderPool:
    """The workers of one provider, plus what the crash-loop backoff needs to remember."""

    config: ProviderConfig
    workers: dict[str, WorkerHandle] = field(default_factory=dict)
    idle: OrderedDict[str, None] = field(default_factory=OrderedDict)
    spawned: int = 0
    load_failures: int = 0
    next_spawn_at: float = 0.0
    last_error: str = ""
    generation: int = 0
    floor: int = 0  # the size set at run time (scale, SIGTTIN/SIGTTOU); 0: min_size
    removed: bool = False  # dropped from the config by a reload: its workers drain, then it goes
    free_slots: list[tuple[int, int]] = field(default_factory=list)  # (slot, restarts so far), lowest first
    slots: int = 0  # slots handed out so far
    gpu_need_mb: float | None = None  # GPU memory its last measured worker used: the cap's estimate for the next

    @property
    def name(self) -> str:
        return self.config.name

    def add(self, handle: WorkerHandle) -> None:
        self.workers[handle.id] = handle
        self.spawned += 1

    def remove(self, handle: WorkerHandle) -> None:
        """Forget an exited worker; one that died while live frees its slot as a crash."""
        if handle.live:
            self._free_slot(handle, crashed=True)
        self.workers.pop(handle.id, None)
        self.idle.pop(handle.id, None)

    def take_slot(self) -> tuple[int, int]:
        """(slot, restarts) for a new worker: the lowest freed slot first, else a new one."""
        if self.free_slots:
            return self.free_slots.pop(0)
        self.slots += 1
        return self.slots - 1, 0

    def _free_slot(self, handle: WorkerHandle, crashed: bool) -> None:
        """A worker leaving the live set hands its slot on, counting a restart when it failed."""
        self.free_slots.append((handle.slot, handle.restarts + int(crashed)))
        self.free_slots.sort()

    def set_state(self, handle: WorkerHandle, state: WorkerState, now: float) -> None:
        """The one place a worker changes state; IDLE workers join the back of the LRU queue."""
        if handle.live and state in (WorkerState.DRAINING, WorkerState.UNHEALTHY):
            self._free_slot(handle, crashed=state is WorkerState.UNHEALTHY)
        handle.state = state
        self.idle.pop(handle.id, None)
        if state is WorkerState.IDLE:
            handle.idle_since = now
            handle.jobs.clear()
            self.idle[handle.id] = None

    def take_idle(self) -> WorkerHandle | None:
        """The worker idle the longest, or None."""
        if not self.idle:
            return None
        worker_id, _ = self.idle.popitem(last=False)
        return self.workers[worker_id]

    def counts(self) -> Counter[WorkerState]:
        return Counter(w.state for w in self.workers.values())

    def by_state(self) -> dict[str, int]:
        """Workers counted by state, every state named (zeros too): what status and the gauges show."""
        counts = self.counts()
        return {state.value: counts[state] for state in WorkerState}

    @property
    def size(self) -> int:
        return sum(1 for w in self.workers.values() if w.live)
