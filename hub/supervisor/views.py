"""The supervisor's status, built from its pools: ``HubStatus``'s parts (hub/status.py holds only the shapes),
the gauges the Prometheus page exports and the pool summary line the log shows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hub.config import ProviderConfig
from hub.status import GpuCard, PoolStatus, ProviderStatus, RequestFigures, SessionTurnStatus, WorkerStatus
from hub.supervisor.gpus import Card
from hub.supervisor.pool import ProviderPool, WorkerHandle


@dataclass(frozen=True)
class PoolView:
    pool: ProviderPool
    queue_depth: int
    sessions: int
    pieces: int  # pieces of split requests on workers
    held_back: str
    target_size: int
    figures: RequestFigures  # from hub.metrics: counters, percentiles, utilisation, throughput
    gpu_error: str  # why GPU readings are missing ("" when NVML works)


def provider_status(provider: ProviderConfig, view: PoolView | None, now: float) -> ProviderStatus:
    """One provider's entry of ``status()["providers"]`` (a disabled provider has no pool, hence no view)."""
    head = ProviderStatus(
        type=provider.type,
        enabled=provider.enabled,
        pool_enabled=provider.pool.enabled,
        model=provider.model,
        min_size=provider.pool.min_size,
        max_size=provider.pool.max_size,
        max_queue=provider.pool.max_queue,
    )
    if view is None:
        return head
    pool = view.pool
    return replace(
        head,
        size=pool.size,
        queue_depth=view.queue_depth,
        pool=PoolStatus(
            figures=view.figures,
            workers_by_state=pool.by_state(),
            target_size=view.target_size,
            sessions=view.sessions,
            pieces_in_flight=view.pieces,
            degraded=bool(pool.load_failures),
            last_error=pool.last_error,
            restart_backoff=max(0.0, pool.next_spawn_at - now),
            held_back=view.held_back,
        ),
        workers=tuple(worker_status(w, now, view.gpu_error) for w in pool.workers.values()),
    )


def worker_status(w: WorkerHandle, now: float, gpu_error: str) -> WorkerStatus:
    return WorkerStatus(
        id=w.id,
        pid=w.pid,
        state=w.state.value,
        device=w.device,
        gpu=None if w.card is None else gpu_card(w.card),  # where it was placed: hub ordinal, NVML index, PCI id
        cuda_pci_bus_id=w.cuda_pci_bus_id,  # the card its own CUDA runtime reports (READY)
        jobs_done=w.jobs_done,
        jobs_held=len(w.jobs),
        sessions=len(w.sessions),
        session_duty=round(w.duty, 3),
        session_turns=tuple(
            SessionTurnStatus(id=sid, step_s=round(t.step_s, 3), duty=round(t.duty, 3))
            for sid, t in sorted(w.turns.items())
            if sid in w.sessions
        ),
        consecutive_failures=w.consecutive_failures,
        rss_mb=round(w.rss_mb, 1),
        since_health_check=round(now - w.last_check, 3) if w.last_check else None,
        slot=w.slot,
        restarts=w.restarts,
        gpu_memory_used_mb=_mb(w.gpu_used_mb),  # this process's own, so summing over workers is right
        gpu_card_used_mb=_mb(w.gpu_card_used_mb),  # the whole card's, every tenant's
        gpu_card_total_mb=_mb(w.gpu_card_total_mb),
        gpu_utilization=w.gpu_utilization,
        gpu_error=w.gpu_error or (gpu_error if w.card is not None else ""),
        uptime=round(now - w.started_at, 3),
        last_error=w.last_error,
    )


def gpu_card(card: Card) -> GpuCard:
    return GpuCard(ordinal=card.ordinal, nvml_index=card.nvml_index, pci_bus_id=card.pci_bus_id, uuid=card.uuid)


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def gauges(views: dict[str, PoolView], ready: bool) -> dict[str, Any]:
    """The snapshot the Prometheus page exports besides the request figures: plain data, safe for its thread."""
    return {
        "ready": ready,
        "providers": {
            name: {
                "size": view.pool.size,
                "min_size": view.pool.config.pool.min_size,
                "max_size": view.pool.config.pool.max_size,
                "queue_depth": view.queue_depth,
                "utilization": view.figures.utilization,
                "throughput": view.figures.throughput,
                "degraded": int(bool(view.pool.load_failures)),
                "max_queue": view.pool.config.pool.max_queue,
                "sessions": view.sessions,
                "pieces_in_flight": view.pieces,
                "held_back": int(bool(view.held_back)),
                "states": view.pool.by_state(),
                "workers": [
                    {
                        "id": w.id,
                        "rss_bytes": w.rss_mb * 2**20,
                        "jobs_done": w.jobs_done,
                        "sessions": len(w.sessions),
                        "session_duty": w.duty,
                        "restarts": w.restarts,
                        "gpu_memory_used_bytes": None if w.gpu_used_mb is None else w.gpu_used_mb * 2**20,
                        "gpu_utilization": w.gpu_utilization,
                    }
                    for w in view.pool.workers.values()
                ],
            }
            for name, view in views.items()
        },
    }


def summary_line(name: str, view: PoolView) -> str:
    """The one-line pool summary logged every ``hub.metrics_log_interval`` seconds."""
    f = view.figures
    by_state = ", ".join(f"{n} {state}" for state, n in view.pool.by_state().items() if n)
    rate = "-" if f.success_rate is None else f"{f.success_rate:.1%}"
    return (
        f"pool {name}: size {view.pool.size} ({by_state or 'no workers'}), queue {view.queue_depth}, "
        f"{f.requests} requests, {rate} ok, wait p95 {f.wait_ms.p95} ms, "
        f"inference p95 {f.inference_ms.p95} ms, utilisation {100 * f.utilization:.0f}%"
    )
