"""The workers' life: started on the card ``hub.cards`` picks, ready, watched, checked, scaled, rolled, stopped.

The ``Workforce`` owns the pools, every worker record and every message to a worker (``send``): a
worker's state, its jobs and sessions, its counts change only through its verbs (``assign``,
``release``, ``tally``, ``unassign_all``, ``free``, ``drain``, ``recycle``). It knows nothing of the
jobs themselves: the farm does. Where the two meet, the workforce asks its ``Employer`` (the farm):
how many jobs wait, a worker is free for work or lost with its jobs, a provider has no worker left
for the jobs that wait, an idle worker is due its health check. The scaling decision is the pure
``hub.supervisor.scaling``; this module carries it out. It touches processes and sockets only through
its ``WorkerIO`` (``hub.supervisor.process``) and reads the time only as the ``now`` it is given, so the unit
tests drive it with a double and a fake clock.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

from hub import protocol
from hub.config import HubConfig
from hub.errors import BadRequest, HubError, UnknownProvider, WorkerCrashed
from hub.protocol import ExitCode, Message, MsgType, WorkerSpec
from hub.supervisor import process
from hub.supervisor.cards import Cards
from hub.supervisor.pool import ProviderPool, WorkerHandle, WorkerState, session_turns
from hub.supervisor.process import WorkerIO
from hub.supervisor.scaling import PoolSnapshot, decide, floor_size

log = logging.getLogger("hub.supervisor")

KILL_GRACE = 3.0  # seconds between SIGTERM (or STOP) and SIGKILL
HELD_LOG_INTERVAL = 60.0  # a pool held back under steady load says so once a minute, not on every pass


class Employer(Protocol):
    """What the workforce needs of the side that gives workers their jobs (the farm)."""

    def queued(self, provider: str) -> int:
        """How many of the provider's jobs wait for a worker."""

    def worker_free(self, worker: WorkerHandle, now: float) -> None:
        """The worker is ready (or finished a job): give it work, or let ``Workforce.free`` idle or retire it."""

    def worker_lost(self, worker: WorkerHandle, error: HubError, now: float) -> None:
        """The worker is gone or going: its job and sessions are lost (retried where allowed)."""

    def provider_down(self, provider: str, reason: str, now: float) -> None:
        """The provider can take no job now: every job waiting for it fails (``PROVIDER_UNAVAILABLE``)."""

    def health_check(self, worker: WorkerHandle, now: float) -> None:
        """Run the bundled clip on this worker, taken from its pool's idle queue."""


class Workforce:
    """The pools and their worker processes, from spawn to exit."""

    employer: Employer  # the farm, which hires this workforce (``Farm.__init__``)

    def __init__(self, config: HubConfig, io: WorkerIO, cards: Cards, backend_path: Path, shm_prefix: str) -> None:
        self.config = config
        self.io = io
        self.backend_path = backend_path
        self.shm_prefix = shm_prefix
        self.pools = {p.name: ProviderPool(p) for p in config.enabled_providers}
        self.cards = cards  # the GPUs the hub may use and their last readings
        self.held_back: dict[str, str] = {}
        self.held_logged: dict[str, float] = {}  # when each pool's held-back scaling was last logged

    def send(
        self,
        worker_id: str,
        msg_type: MsgType,
        msg_id: str,
        body: dict[str, Any] | None = None,
        payload: bytes | None = None,
    ) -> Exception | None:
        """Every message to a worker is built and sent here (zguide's ``send_to_worker``); returns the error
        when the worker is gone (nothing is dropped silently)."""
        return self.io.send(worker_id, protocol.build(msg_type, msg_id, body, payload))

    # --- the verbs: the only writers of a worker's record besides the pool's ``set_state`` ---

    def assign(self, worker: WorkerHandle, job_id: str, session: bool, now: float) -> None:
        """The worker takes a one-shot job (or health check), or serves one more live session: it is busy."""
        if session:
            worker.sessions.add(job_id)
        else:
            worker.jobs.append(job_id)
        self.pools[worker.provider].set_state(worker, WorkerState.BUSY, now)

    def release(self, worker: WorkerHandle, job_id: str) -> None:
        """The job (or session) is off the worker; ``free`` decides what the worker does next."""
        if job_id in worker.sessions:
            worker.sessions.discard(job_id)
        elif job_id in worker.jobs:
            worker.jobs.remove(job_id)

    def tally(self, worker: WorkerHandle, counted: bool, model_failed: bool) -> None:
        """An answer from the worker: one more job done (health checks are not counted), and its run of
        model failures, which recycles it at ``pool.max_consecutive_failures``."""
        worker.jobs_done += int(counted)
        worker.consecutive_failures = worker.consecutive_failures + 1 if model_failed else 0

    def unassign_all(self, worker: WorkerHandle) -> list[str]:
        """The worker is gone or going: take every job and session off it; returns their ids."""
        held = [*worker.jobs, *worker.sessions]
        worker.jobs.clear()
        worker.sessions.clear()
        return held

    @property
    def sizes(self) -> dict[str, int]:
        """Live workers of each pool."""
        return {name: pool.size for name, pool in self.pools.items()}

    def worker(self, worker_id: str) -> WorkerHandle | None:
        """The live handle of a worker id (``<provider>-<n>``), or None once it is gone."""
        pool = self.pools.get(worker_id.rpartition("-")[0])
        return pool.workers.get(worker_id) if pool else None

    def on_message(self, worker: WorkerHandle, msg: Message, now: float) -> None:
        """A worker's HEARTBEAT (with its session duty), READY or LOAD_FAILED."""
        if msg.type is MsgType.HEARTBEAT:
            busy = msg.body.get("busy")
            if isinstance(busy, (int, float)) and now > worker.last_heartbeat:
                worker.duty = max(0.0, float(busy) - worker.busy) / (now - worker.last_heartbeat)
                worker.busy = float(busy)
                worker.turns = session_turns(worker.turns, msg.body.get("turns"), now - worker.last_heartbeat)
            worker.last_heartbeat = now
        elif msg.type is MsgType.READY:
            self.on_ready(worker, msg.body, now)
        elif msg.type is MsgType.LOAD_FAILED:
            worker.last_error = str(msg.body.get("error", "unknown error"))

    def on_ready(self, worker: WorkerHandle, body: dict[str, Any], now: float) -> None:
        """A started worker loaded its model: it retires an old-generation worker in a rolling restart, then works."""
        if worker.state is not WorkerState.STARTING:
            return
        pool = self.pools[worker.provider]
        worker.device = str(body.get("device", "unknown"))
        self.cards.check_ready(worker, body)
        worker.last_heartbeat = worker.last_check = now
        pool.load_failures = 0
        pool.last_error = ""
        where = worker.device if worker.card is None else f"{worker.device} on {worker.card.describe()}"
        log.info("worker %s ready (pid %d, %s) in %.2f s", worker.id, worker.pid, where, now - worker.started_at)
        old = [w for w in pool.workers.values() if w.live and w.generation < pool.generation]
        if worker.generation == pool.generation and old:
            replaced = next((w for w in old if w.state is WorkerState.IDLE), old[0])
            log.info("rolling restart of %s: %s replaces %s", pool.name, worker.id, replaced.id)
            self.drain(replaced, now)
        self.employer.worker_free(worker, now)

    def checked(self, worker: WorkerHandle, msg: Message, now: float) -> bool:
        """A health check's answer: one with no text (or an error) recycles the worker; True when it passed."""
        if msg.type is MsgType.ERROR or not str(msg.body.get("text", "")).strip():
            reason = msg.body.get("message") or "no text for the test clip"
            self.recycle(worker, f"health check failed: {reason}", now)
            return False
        worker.last_check = now
        return True

    def free(self, worker: WorkerHandle, now: float) -> bool:
        """A worker with nothing left to run: drained when it is due to go (draining already, too many failed
        jobs in a row, ``pool.max_jobs_per_worker``), else idle; True when it can take work."""
        pool = self.pools[worker.provider]
        limits = pool.config.pool
        if worker.state is WorkerState.UNHEALTHY:  # on its way out: a late answer frees nothing
            return False
        if worker.state is WorkerState.DRAINING:
            self.drain(worker, now)
        elif worker.consecutive_failures >= limits.max_consecutive_failures:
            log.warning("recycling worker %s: %d failed jobs in a row", worker.id, worker.consecutive_failures)
            self.drain(worker, now)
        elif limits.max_jobs_per_worker and worker.jobs_done >= limits.max_jobs_per_worker:
            log.info("recycling worker %s after %d jobs (pool.max_jobs_per_worker)", worker.id, worker.jobs_done)
            self.drain(worker, now)
        else:
            pool.set_state(worker, WorkerState.IDLE, now)
            return True
        return False

    def read_cards(self) -> None:
        """One NVML reading per card, for this pass's ``sample`` calls."""
        self.cards.read()

    def retire(self, name: str) -> bool:
        """Drop a removed provider's pool once its last worker is gone; True if it was dropped."""
        if self.pools[name].workers:
            return False
        del self.pools[name]
        return True

    def sample(self, pool: ProviderPool, worker: WorkerHandle) -> None:
        """The worker's RSS and its share of its card's last reading."""
        worker.rss_mb = self.io.rss_mb(worker.pid)
        self.cards.sample(pool, worker)

    def watch(self, pool: ProviderPool, worker: WorkerHandle, now: float) -> bool:
        """Reap an exited worker; kill an overdue one; recycle one slow to start or silent. True when the
        worker is up and answering, so that the farm watches its jobs next."""
        code = worker.proc.poll()
        if code is not None:
            self.on_exit(pool, worker, code, now)
            return False
        if worker.kill_at is not None:
            if now >= worker.kill_at:
                self.io.kill(worker.proc)
            return False
        hub = self.config.hub
        if worker.state is WorkerState.STARTING:
            if now - worker.started_at > hub.start_timeout:
                self.recycle(worker, f"not ready after {hub.start_timeout:.0f} s", now)
            return False
        if now - worker.last_heartbeat > hub.heartbeat_timeout:
            self.employer.worker_lost(worker, WorkerCrashed(f"worker {worker.id} stopped answering"), now)
            self.recycle(worker, f"no heartbeat for {now - worker.last_heartbeat:.1f} s", now)
            return False
        return True

    def on_exit(self, pool: ProviderPool, worker: WorkerHandle, code: int, now: float) -> None:
        """An exited worker leaves its pool; a failed model load backs the next start off; its jobs are lost."""
        pool.remove(worker)
        what = process.describe_exit(code)
        if code == ExitCode.MODEL_LOAD_ERROR:
            pool.load_failures += 1
            delay = process.backoff(pool.load_failures)
            pool.next_spawn_at = now + delay
            pool.last_error = worker.last_error or what
            log.error("worker %s %s: %s; next start in %.0f s", worker.id, what, pool.last_error, delay)
            if pool.size == 0:
                self.employer.provider_down(
                    pool.name, f"provider {pool.name!r} has no live worker: {pool.last_error}", now
                )
        elif worker.state is not WorkerState.DRAINING:
            what += f" ({worker.last_error})" if worker.last_error else ""
            pool.last_error = f"worker {worker.id} {what}"
            log.warning("worker %s (pid %d) %s", worker.id, worker.pid, what)
        self.employer.worker_lost(worker, WorkerCrashed(f"worker {worker.id} {what} while running the job"), now)

    def tend(self, pool: ProviderPool, now: float) -> None:
        """The pool's routine while the hub runs: health checks, the rolling restart, scaling."""
        self._health_checks(pool, now)
        self._roll(pool, now)
        self._scale(pool, now)

    def _health_checks(self, pool: ProviderPool, now: float) -> None:
        """Send the bundled clip to idle workers whose last check is ``health_check_interval`` old.

        Client jobs come first: nothing is checked while jobs wait, and the last idle worker
        of a pool is checked only once the pool has been quiet for a whole interval.
        """
        interval = pool.config.pool.health_check_interval
        if self.employer.queued(pool.name):
            return
        for worker_id in list(pool.idle):
            worker = pool.workers[worker_id]
            alone = len(pool.idle) == 1
            if now - worker.last_check < interval or (alone and now - worker.idle_since < interval):
                continue
            pool.idle.pop(worker_id)
            self.employer.health_check(worker, now)

    def _roll(self, pool: ProviderPool, now: float) -> None:
        """After a reload, start one worker of the new generation at a time; ``on_ready`` retires an old one.
        Once the new generation fills the (perhaps smaller) pool, the old workers that remain just drain."""
        old = [w for w in pool.workers.values() if w.live and w.generation < pool.generation]
        new = [w for w in pool.workers.values() if w.live and w.generation == pool.generation]
        if not old:
            return
        if len(new) >= pool.config.pool.max_size and all(w.state is not WorkerState.STARTING for w in new):
            for worker in old:
                self.drain(worker, now)
        elif not any(w.state is WorkerState.STARTING for w in new) and now >= pool.next_spawn_at:
            self.spawn(pool, now)

    def recycle(self, worker: WorkerHandle, reason: str, now: float) -> None:
        """Stop a worker that cannot be trusted: SIGTERM now, SIGKILL after a grace period. The jobs it still
        holds are lost with it when it exits (``Employer.worker_lost``), unless it answers them first."""
        log.warning("recycling worker %s (pid %d): %s", worker.id, worker.pid, reason)
        worker.last_error = reason
        self.pools[worker.provider].set_state(worker, WorkerState.UNHEALTHY, now)
        worker.kill_at = now + KILL_GRACE
        self.io.terminate(worker.proc)

    def drain(self, worker: WorkerHandle, now: float) -> None:
        """Stop a healthy worker politely: it takes no new job, finishes the one it has, then exits on STOP."""
        self.pools[worker.provider].set_state(worker, WorkerState.DRAINING, now)
        if worker.jobs or worker.sessions or worker.kill_at is not None:
            return
        worker.kill_at = now + KILL_GRACE
        if self.send(worker.id, MsgType.STOP, worker.id) is not None:
            self.io.terminate(worker.proc)

    def _snapshot(self, pool: ProviderPool) -> PoolSnapshot:
        counts = pool.counts()
        live = [w for w in pool.workers.values() if w.live]
        return PoolSnapshot(
            sessions=sum(len(w.sessions) for w in live),
            live=len(live),
            starting=counts[WorkerState.STARTING],
            queued=self.employer.queued(pool.name),
            idle_since=tuple((wid, pool.workers[wid].idle_since) for wid in pool.idle),
            floor=pool.floor,
            memory_mb=sum(w.rss_mb for w in live),
            worker_mb=max((w.rss_mb for w in live), default=0.0),
        )

    def target_size(self, pool: ProviderPool) -> int:
        """The size the pool is heading for: its floor, raised by what the scaling policy keeps."""
        return floor_size(self._snapshot(pool), pool.config.pool)

    def _scale(self, pool: ProviderPool, now: float) -> None:
        if now < pool.next_spawn_at:
            return
        decision = decide(self._snapshot(pool), pool.config.pool, now)
        self._held(pool, decision.held_back, now)
        for worker_id in decision.retire:
            log.info("retiring worker %s of %s: idle, pool above its floor", worker_id, pool.name)
            self.drain(pool.workers[worker_id], now)
        for _ in range(decision.spawn):
            if not self.spawn(pool, now):
                break

    def _held(self, pool: ProviderPool, why: str, now: float) -> None:
        """Record why the pool does not grow (status ``held_back``), logging it at most once a minute."""
        if why and now - self.held_logged.get(pool.name, -HELD_LOG_INTERVAL) >= HELD_LOG_INTERVAL:
            log.info("scaling of %s held back: %s", pool.name, why)
            self.held_logged[pool.name] = now
        self.held_back[pool.name] = why

    @property
    def ready(self) -> bool:
        """Every enabled provider has its ``min_size`` workers ready."""
        return all(
            sum(1 for w in pool.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))
            >= pool.config.pool.min_size
            for pool in self.pools.values()
            if not pool.removed
        )

    def scale(self, name: object, size: object, now: float) -> dict[str, Any]:
        """An operator's SCALE: the pool's new size, within its ``min_size`` and ``max_size``; returns the reply."""
        pool = self.pools.get(name) if isinstance(name, str) else None
        if pool is None or pool.removed:
            raise UnknownProvider(f"no enabled provider named {name!r}")
        if not isinstance(size, int) or isinstance(size, bool):
            raise BadRequest("field 'size' must be an integer")
        self.set_size(pool, size, False, now)
        return {"provider": pool.name, "size": size}

    def step_sizes(self, step: int, now: float) -> None:
        """SIGTTIN / SIGTTOU: one worker more (or fewer) than each pool's target, within its bounds."""
        for pool in self.pools.values():
            if not pool.removed:
                self.set_size(pool, self.target_size(pool) + step, True, now)

    def set_size(self, pool: ProviderPool, size: int, clamp: bool, now: float) -> None:
        """Set the pool's size at run time: the floor autoscaling keeps; extra workers retire now."""
        limits = pool.config.pool
        if clamp:
            size = min(limits.max_size, max(limits.min_size, size))
        elif not limits.min_size <= size <= limits.max_size:
            raise BadRequest(
                f"size {size} is outside [{limits.min_size}, {limits.max_size}] "
                f"(providers.{pool.name}.pool.min_size / max_size)"
            )
        pool.floor = size
        log.info("provider %s: size set to %d", pool.name, size)
        extra = pool.size - size
        by_use = [pool.workers[w] for w in pool.idle] + [
            w for w in pool.workers.values() if w.state is not WorkerState.IDLE
        ]
        for worker in [w for w in by_use if w.live][: max(0, extra)]:
            self.drain(worker, now)

    def spawn(self, pool: ProviderPool, now: float) -> bool:
        """Start one worker of ``pool`` on the card placement picks; False when the GPU memory cap holds it back."""
        provider = pool.config
        placement = self.cards.place(pool, self.pools.values())
        if placement.held_back:
            self._held(pool, placement.held_back, now)
            return False
        card = placement.card
        slot, restarts = pool.take_slot()
        spec = WorkerSpec(
            id=f"{provider.name}-{pool.spawned + 1}",
            provider=provider.name,
            type=provider.type,
            model=provider.model,
            device=provider.device,
            compute_type=provider.compute_type,
            cpu_threads=provider.cpu_threads,
            backend=f"ipc://{self.backend_path}",
            shm_prefix=self.shm_prefix,
            heartbeat_interval=self.config.hub.heartbeat_interval,
            options=provider.options,
            allow_download=provider.allow_download,
            log_format=self.config.hub.log_format,
            stream=dataclasses.asdict(provider.stream),
            max_batch=provider.pool.max_batch,
            batch_wait_ms=provider.pool.batch_wait_ms,
        )
        proc = self.io.spawn(spec, provider, card)
        handle = WorkerHandle(spec.id, provider.name, proc, card, started_at=now, last_heartbeat=now)
        handle.generation, handle.slot, handle.restarts = pool.generation, slot, restarts
        pool.add(handle)
        log.info("started worker %s (pid %d, %s)", spec.id, proc.pid, "CPU" if card is None else card.describe())
        return True

    def reconfigure(self, new: HubConfig, now: float) -> None:
        """A reloaded config: pools that stay get a new generation (a rolling restart), removed ones drain."""
        for name, pool in self.pools.items():
            provider = new.providers.get(name)
            if provider is None or not provider.enabled:
                log.info("provider %s left the config: draining its workers", name)
                pool.removed = True
                self.employer.provider_down(name, f"provider {name!r} was removed from the config", now)
                for worker in list(pool.workers.values()):
                    self.drain(worker, now)
            else:
                pool.config = provider
                pool.removed = False
                pool.generation += 1
                pool.floor = 0
                pool.load_failures = 0
                pool.next_spawn_at = now
        for provider in new.enabled_providers:
            if provider.name not in self.pools:
                self.pools[provider.name] = ProviderPool(provider)
        self.config = new

    def close(self) -> int:
        """Stop every worker (STOP, then SIGTERM, then SIGKILL); return how many there were."""
        workers = [w for pool in self.pools.values() for w in pool.workers.values()]
        for worker in workers:
            self.send(worker.id, MsgType.STOP, worker.id)
        self.io.stop_all([w.proc for w in workers], KILL_GRACE)
        return len(workers)
