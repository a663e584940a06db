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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pydantic is imported on the first encode or decode: a client that reads no status skips it
    from pydantic import GetCoreSchemaHandler, TypeAdapter
    from pydantic_core import CoreSchema

FLAT = {"flat": True}  # a part whose keys sit in its parent's dict, not under its own name
OMIT_NONE = {"omit_none": True}  # a part whose key is left out while it is None
SERVING = ("idle", "busy")  # the worker states that count towards a pool's min_size
W = TypeVar("W", bound="Wire")


class Wire:
    """``to_dict``/``from_dict`` by pydantic, read off the dataclass's fields, so each part of the status is
    declared once: field order is key order, a field's default is what a key missing from an older hub means,
    and a key a newer hub adds is ignored. Two field markers shape the dict: ``FLAT`` (the part's keys sit in
    its parent's dict) and ``OMIT_NONE`` (no key while the value is None)."""

    def to_dict(self) -> dict[str, Any]:
        return _adapter(type(self)).dump_python(self, mode="json")

    @classmethod
    def from_dict(cls: type[W], d: Mapping[str, Any]) -> W:
        return _adapter(cls).validate_python(d)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        """The dataclass's own schema; where a field is marked, its dict is laid out by ``_layout`` both ways:
        flat parts read from and written into the parent's dict, and None left out where marked."""
        from pydantic_core import core_schema

        schema = handler(source)
        if not any(f.metadata for f in fields(source)):
            return schema
        keys = _layout(source)
        wire = core_schema.typed_dict_schema(
            {k.name: core_schema.typed_dict_field(handler.generate_schema(k.kind), required=False) for k in keys}
        )
        hints = typing.get_type_hints(source)
        flat = tuple((f.name, _layout(_strip_none(hints[f.name]))) for f in fields(source) if f.metadata.get("flat"))
        return core_schema.no_info_before_validator_function(
            functools.partial(_nest, flat),
            {k: v for k, v in schema.items() if k != "ref"},
            serialization=core_schema.plain_serializer_function_ser_schema(
                functools.partial(_spread, keys), return_schema=wire
            ),
            ref=schema.get("ref"),  # where the class is met again, it is this schema
        )


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    """The class's pydantic codec, built on its first use (a client that never reads a status builds none)."""
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        from pydantic import TypeAdapter

        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


@dataclass(frozen=True)
class _Key:
    """One key of a dict on the wire: where its value is in the dataclass (a chain of attributes through flat
    parts) and the value's type."""

    name: str
    kind: Any
    path: tuple[str, ...]  # attributes from the dataclass to the value; a None on the way means no key
    omit_none: bool = False


@functools.cache
def _layout(cls: type) -> tuple[_Key, ...]:
    """Every key a dataclass puts in its dict, in field order, its flat parts' keys in their place."""
    hints = typing.get_type_hints(cls)
    keys: list[_Key] = []
    for f in fields(cls):
        if f.metadata.get("flat"):
            keys += [replace(k, path=(f.name, *k.path)) for k in _layout(_strip_none(hints[f.name]))]
        else:
            keys.append(_Key(f.name, hints[f.name], (f.name,), bool(f.metadata.get("omit_none"))))
    return tuple(keys)


def _strip_none(kind: Any) -> Any:
    """``X`` for ``X | None``; anything else as it is."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
        return inner
    return kind


def _spread(keys: tuple[_Key, ...], value: Any) -> dict[str, Any]:
    """The dict of a dataclass with flat parts (its values still typed: pydantic serializes them)."""
    out: dict[str, Any] = {}
    for key in keys:
        item = value
        for name in key.path[:-1]:
            item = getattr(item, name)
            if item is None:  # an absent part: none of its keys
                break
        else:
            item = getattr(item, key.path[-1])
            if item is not None or not key.omit_none:
                out[key.name] = item
    return out


def _nest(flat: tuple[tuple[str, tuple[_Key, ...]], ...], d: Any) -> Any:
    """A wire dict as the dataclass's fields take it: each flat part reads the same dict when any of its keys
    is there (else it takes its field's default)."""
    if not isinstance(d, Mapping):
        return d  # a typed value already, or what pydantic will refuse
    nested = dict(d)
    for name, keys in flat:
        if any(k.name in d for k in keys):
            nested[name] = d
    return nested


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
    pieces: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)
    success_rate: float | None = None
    wait_ms: Percentiles = Percentiles()
    inference_ms: Percentiles = Percentiles()
    utilization: float = 0.0
    throughput: float = 0.0
    mean_batch: float | None = None  # jobs per forward pass over the last minute (pool.max_batch); None: no batch


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
    state: str = ""  # a ``hub.supervisor.pool.WorkerState`` value
    device: str = ""
    gpu: GpuCard | None = None
    cuda_pci_bus_id: str = ""
    jobs_done: int = 0
    jobs_held: int = 0  # one-shot jobs it holds now, decoding or waiting for its next batch (up to pool.max_batch)
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
    pieces_in_flight: int = 0
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
