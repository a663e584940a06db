"""The hub's status: its typed shape on the wire, and the pure functions that build it.

``HubStatus`` and its parts are frozen dataclasses whose ``to_dict`` gives the JSON the STATUS
request answers with, key for key, and whose ``from_dict`` reads it back: keys it does not know
(a newer hub) are ignored and keys it misses (an older hub) take their field's default, so old
clients and new hubs keep talking. ``HubStatus.readiness`` is the one rule for whether a hub takes
requests, read by ``wait_ready``, ``HubPool``, the CLI and the gateway's ``/readyz``.

The builders are pure functions of a ``PoolView`` (what the supervisor knows of one pool at one
instant) and of the request figures from ``hub.metrics``; no sockets, no clocks of their own. The
supervisor-side types are imported for annotations only, so a client importing this module drags
nothing of the supervisor in.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from hub.config import ProviderConfig
    from hub.gpus import Card
    from hub.pool import ProviderPool, WorkerHandle

FLAT = {"flat": True}  # a part whose keys sit in its parent's dict, not under its own name
OMIT_NONE = {"omit_none": True}  # a part whose key is left out while it is None
SERVING = ("idle", "busy")  # the worker states that count towards a pool's min_size
W = TypeVar("W", bound="Wire")


class Wire:
    """``to_dict``/``from_dict`` read off the dataclass's fields, so each part of the status is declared
    once: field order is key order, a field's default is what a key missing from an older hub means."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for slot in _plan(type(self)):
            value = getattr(self, slot.name)
            if slot.part is not None:
                if value is not None:
                    out.update(value.to_dict())
            elif value is not None or not slot.omit_none:
                out[slot.name] = slot.encode(value)
        return out

    @classmethod
    def from_dict(cls: type[W], d: Mapping[str, Any]) -> W:
        given: dict[str, Any] = {}
        for slot in _plan(cls):
            if slot.part is not None:
                if slot.keys is None or not slot.keys.isdisjoint(d):
                    given[slot.name] = slot.part.from_dict(d)
            elif slot.name in d:
                given[slot.name] = slot.decode(d[slot.name])
        return cls(**given)


Codec = Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Slot:
    """How one field crosses the wire, worked out once per class from its type hint."""

    name: str
    omit_none: bool = False
    encode: Codec = _same
    decode: Codec = _same
    part: type[Wire] | None = None  # a flat part: read with its ``from_dict`` from the parent's dict
    keys: frozenset[str] | None = None  # a flat part that may be absent: present when any of its keys is


@functools.cache
def _plan(cls: type) -> tuple[_Slot, ...]:
    hints = typing.get_type_hints(cls)
    slots = []
    for f in fields(cls):
        kind = hints[f.name]
        if f.metadata.get("flat"):
            part = _strip_none(kind)
            slots.append(_Slot(f.name, part=part, keys=None if part is kind else _keys(part)))
        else:
            slots.append(_Slot(f.name, bool(f.metadata.get("omit_none")), _codec(kind, out=True), _codec(kind, out=False)))
    return tuple(slots)


@functools.cache
def _keys(cls: type) -> frozenset[str]:
    """Every key a part puts in its dict, its flat parts' included."""
    return frozenset().union(*(_keys(s.part) if s.part is not None else {s.name} for s in _plan(cls)))


def _strip_none(kind: Any) -> Any:
    """``X`` for ``X | None``; anything else as it is."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        return inner
    return kind


def _codec(kind: Any, out: bool) -> Codec:
    """One way of a field's crossing: ``out`` (typed to JSON: parts to dicts, tuples to lists) or in (JSON to
    typed: dicts to parts, lists to tuples); mappings are copied, plain values stay as they are."""
    inner = _strip_none(kind)
    origin = typing.get_origin(inner)
    each: Codec
    if isinstance(inner, type) and issubclass(inner, Wire):
        each = inner.to_dict if out else inner.from_dict
    elif origin is tuple:
        item, sequence = _codec(typing.get_args(inner)[0], out), list if out else tuple
        each = lambda v: sequence(item(x) for x in v)  # noqa: E731
    elif origin in (Mapping, dict):
        value = _codec(typing.get_args(inner)[1], out)
        each = lambda v: {k: value(x) for k, x in v.items()}  # noqa: E731
    else:
        return _same
    return each if inner is kind else lambda v: None if v is None else each(v)


# --- the shape on the wire -------------------------------------------------------------------


class ReadyState(str, Enum):
    """Whether a hub takes requests now."""

    READY = "ready"
    NOT_READY = "not ready"  # some enabled pool is short of its min_size (loading, or failing to load)
    DRAINING = "draining"  # shutting down: it finishes what it has and takes nothing new


@dataclass(frozen=True)
class HubInfo(Wire):
    """``status["hub"]``: the supervisor itself."""

    id: str = ""
    pid: int = 0
    version: str = ""
    frontend: str = ""
    uptime: float = 0.0
    ready: bool = False  # every enabled pool has its min_size workers (draining or not)
    shutting_down: bool = False
    dropped_replies: int = 0
    malformed_messages: int = 0
    inline_bytes: int = 0


@dataclass(frozen=True)
class Percentiles(Wire):
    """Milliseconds; None before the first sample."""

    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class RequestFigures(Wire):
    """A provider's request counts and timings since the supervisor started (``hub.metrics``)."""

    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    timed_out: int = 0
    session_resumes: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)
    success_rate: float | None = None
    wait_ms: Percentiles = Percentiles()
    inference_ms: Percentiles = Percentiles()
    utilization: float = 0.0
    throughput: float = 0.0


@dataclass(frozen=True)
class GpuCard(Wire):
    """The card a worker was placed on, as status names it."""

    ordinal: int = 0
    nvml_index: int | None = None
    pci_bus_id: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class SessionTurnStatus(Wire):
    """One live session on a worker: its step interval now (``stream.step_ms``, stretched when the worker's
    sessions need more decoding than it can do) and the fraction of the worker's time its decodes take."""

    id: str = ""
    step_s: float = 0.0
    duty: float = 0.0


@dataclass(frozen=True)
class WorkerStatus(Wire):
    id: str = ""
    pid: int = 0
    state: str = ""  # a ``hub.pool.WorkerState`` value
    device: str = ""
    gpu: GpuCard | None = None
    cuda_pci_bus_id: str = ""
    jobs_done: int = 0
    sessions: int = 0
    session_duty: float = 0.0
    session_turns: tuple[SessionTurnStatus, ...] = ()
    consecutive_failures: int = 0
    rss_mb: float = 0.0
    since_health_check: float | None = None
    slot: int = 0
    restarts: int = 0
    gpu_memory_used_mb: float | None = None
    gpu_card_used_mb: float | None = None
    gpu_card_total_mb: float | None = None
    gpu_utilization: float | None = None
    gpu_error: str = ""
    uptime: float = 0.0
    last_error: str = ""

    @property
    def serving(self) -> bool:
        """Idle or busy: it counts towards its pool's ``min_size``."""
        return self.state in SERVING


@dataclass(frozen=True)
class PoolStatus(Wire):
    """What a provider with a pool adds to its entry (a disabled provider has none)."""

    figures: RequestFigures = field(default=RequestFigures(), metadata=FLAT)
    workers_by_state: Mapping[str, int] = field(default_factory=dict)
    target_size: int = 0
    sessions: int = 0
    degraded: bool = False
    last_error: str = ""
    restart_backoff: float = 0.0
    held_back: str = ""


@dataclass(frozen=True)
class ProviderStatus(Wire):
    """``status["providers"][name]``: its config echoed back, its pool, its workers."""

    type: str = ""
    enabled: bool = True
    pool_enabled: bool = True
    model: str = ""
    min_size: int = 0
    max_size: int = 0
    max_queue: int = 0
    size: int = 0
    queue_depth: int = 0
    pool: PoolStatus | None = field(default=None, metadata=FLAT)
    workers: tuple[WorkerStatus, ...] = ()

    @property
    def serving(self) -> int:
        return sum(w.serving for w in self.workers)

    @property
    def short(self) -> bool:
        """Enabled and below its ``min_size`` of serving workers: what keeps a hub from being ready."""
        return self.enabled and self.serving < self.min_size


@dataclass(frozen=True)
class ShadowStatus(Wire):
    provider: str = ""
    fraction: float = 0.0
    on: bool = True


@dataclass(frozen=True)
class WindowStatus(Wire):
    """A route provider's analysis window."""

    requests: int = 0
    error_rate: float = 0.0
    p95_ms: float | None = None


@dataclass(frozen=True)
class RouteShare(Wire):
    """What a route sent one of its providers since the start."""

    weight: float = 0.0
    requests: int = 0
    errors: int = 0


@dataclass(frozen=True)
class Spread(Wire):
    """Count, mean and percentiles of plain numbers (a shadow's WER, its latency ratio)."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None


@dataclass(frozen=True)
class RouteFigures(Wire):
    """A route's counters from ``hub.metrics``."""

    providers: Mapping[str, RouteShare] = field(default_factory=dict)
    shadow_requests: Mapping[str, int] = field(default_factory=dict)  # "<provider> compared|dropped|failed"
    agreement_wer: Mapping[str, Spread] = field(default_factory=dict)
    latency_ratio: Mapping[str, Spread] = field(default_factory=dict)
    rollbacks: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RouteStatus(Wire):
    """``status["routes"][name]``: a gray release's weights, shadow, analysis and figures."""

    weights: Mapping[str, float] = field(default_factory=dict)
    configured_weights: Mapping[str, float] = field(default_factory=dict)
    sticky: bool = False
    shadow: ShadowStatus | None = None
    analysis: Mapping[str, WindowStatus] | None = None
    rolled_back: Mapping[str, str] = field(default_factory=dict)
    figures: RouteFigures = field(default=RouteFigures(), metadata=FLAT)


@dataclass(frozen=True)
class GatewayStatus(Wire):
    """``status["gateway"]``, present when the supervisor runs the gateway."""

    pid: int | None = None
    running: bool = False
    url: str = ""
    wyoming_port: int | None = None
    restarts: int = 0
    last_exit: str = ""


@dataclass(frozen=True)
class HubStatus(Wire):
    """The answer to a STATUS request."""

    hub: HubInfo = HubInfo()
    providers: Mapping[str, ProviderStatus] = field(default_factory=dict)
    routes: Mapping[str, RouteStatus] = field(default_factory=dict)
    gateway: GatewayStatus | None = field(default=None, metadata=OMIT_NONE)

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> HubStatus | None:
        """One hub's entry of a pool's status (``HubPool.status()["hubs"]``): its status, or None for
        ``{"error": ...}``, a hub that did not answer."""
        return cls.from_dict(entry) if "hub" in entry else None

    @property
    def readiness(self) -> ReadyState:
        """The one readiness rule: a draining hub is not ready, whatever its pools say."""
        if self.hub.shutting_down:
            return ReadyState.DRAINING
        return ReadyState.READY if self.hub.ready else ReadyState.NOT_READY

    @property
    def ready(self) -> bool:
        return self.readiness is ReadyState.READY

    def short(self) -> dict[str, ProviderStatus]:
        """The enabled providers below their ``min_size``, by name: why a hub is not ready."""
        return {name: p for name, p in self.providers.items() if p.short}


# --- building it, on the supervisor's side -----------------------------------------------------


@dataclass(frozen=True)
class PoolView:
    pool: ProviderPool
    queue_depth: int
    sessions: int
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
        sessions=len(w.sessions),
        session_duty=round(w.duty, 3),
        session_turns=tuple(
            SessionTurnStatus(id=sid, step_s=round(t.step_s, 3), duty=round(t.duty, 3))
            for sid, t in sorted(w.turns.items()) if sid in w.sessions
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
