"""The YAML config as frozen dataclasses, loaded and checked once, before any worker starts.

The schema *is* the dataclasses below: pydantic checks each section against them, so a key
that is not a field, or a value of the wrong type, is an error naming its key path
(``providers.whisper.pool.min_size: expected an integer, got str 'two'``); a field added to a
dataclass is a key of the config with nothing else to change. An IDE completes
``config.providers["whisper"].pool.max_queue`` like any other typed object.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from hub import protocol
from hub.audio import upload_peak_bytes
from hub.provider_types import PROVIDER_TYPES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("text", "json")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,39}$")


class ConfigError(ValueError):
    """The config is invalid; the message starts with the key path at fault."""


@dataclass(frozen=True)
class PoolConfig:
    """How many workers a provider runs and how jobs wait for them."""

    enabled: bool = True
    min_size: int = 1
    max_size: int = 2
    max_queue: int = 64
    idle_timeout: float = 300.0
    acquire_timeout: float = 30.0
    health_check_interval: float = 60.0
    job_timeout: float = 60.0
    job_timeout_per_audio_second: float = 2.0
    retry_on_crash: int = 1
    max_consecutive_failures: int = 3
    max_jobs_per_worker: int = 0
    max_memory_mb: float = 0.0
    max_gpu_memory_fraction: float = (
        0.0  # 0: off; else a new worker starts only where it fits under this share of a card
    )
    # live sessions one worker serves at once, taking turns; 4 because with VAD and one decode per step four
    # mostly silent sessions per tiny.en CPU worker keep finals within 3 s (bench/README.md, live at scale);
    # continuous talkers need about one worker per two
    sessions_per_worker: int = 4
    max_sessions: int | None = None  # live sessions of the whole pool at most; None: max_size * sessions_per_worker
    session_idle_timeout: float = 30.0
    max_session_seconds: float = 3600.0
    # jobs one worker holds at once and decodes together in one forward pass; 1 until batching on a CPU is
    # confirmed on a quiet host (bench/README.md, batched decoding); raise it on a GPU
    max_batch: int = 1
    batch_wait_ms: float = 5.0  # a worker holding fewer than max_batch jobs waits this long for more before it decodes
    # a one-shot request longer than this is cut at pauses into pieces of at most split_piece_seconds,
    # decoded on every worker of the pool and stitched in order (docs/guides/provider_pooling.md §1.6); 0: never
    split_over_seconds: float = 60.0
    split_piece_seconds: float = 30.0

    @property
    def session_limit(self) -> int:
        """How many live sessions the pool holds at most: by default as many as its largest size can serve,
        and in a single instance one (one-shot jobs then wait behind the session, as behind the old lock)."""
        if self.max_sessions is not None:
            return self.max_sessions
        return self.max_size * self.sessions_per_worker


@dataclass(frozen=True)
class StreamConfig:
    """Live-session decoding: a decode every ``step_ms`` of new audio over a window of at most ``window_seconds``;
    with ``vad``, only while Silero VAD hears speech (at or above ``vad_threshold``), and an utterance's final
    at once after ``endpoint_ms`` of silence (docs/guides/provider_pooling.md §1.2)."""

    step_ms: int = 1000
    window_seconds: float = 15.0
    vad: bool = True
    endpoint_ms: int = 600
    vad_threshold: float = 0.5


MAX_BATCH = 256  # pool.max_batch at most: far beyond what one card decodes at once
MAX_BATCH_WAIT_MS = 1000.0  # pool.batch_wait_ms at most: a longer wait is latency no batch repays
SINGLE_INSTANCE = PoolConfig(
    enabled=False, min_size=1, max_size=1, sessions_per_worker=1, max_sessions=1, split_over_seconds=0.0
)


@dataclass(frozen=True)
class ProviderConfig:
    """One pool of identical workers serving one model."""

    name: str
    type: str
    enabled: bool = True
    model: str = ""
    device: str = "auto"
    devices: tuple[int, ...] | None = None  # hub GPU ordinals (see hub.gpus); None: every GPU the hub may use
    compute_type: str = "auto"
    cpu_threads: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    allow_download: bool = False
    stream: StreamConfig = StreamConfig()
    pool: PoolConfig = SINGLE_INSTANCE


@dataclass(frozen=True)
class CurveConfig:
    """ZeroMQ CURVE on the frontend: the server's secret key file and a folder of allowed client public keys."""

    server_secret_key: str = ""
    allowed_clients: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.server_secret_key)


@dataclass(frozen=True)
class HubSection:
    """Supervisor-wide settings."""

    frontend: str = "tcp://127.0.0.1:5555"
    runtime_dir: str = ""
    max_audio_seconds: float = 1800.0
    drain_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    start_timeout: float = 120.0
    log_level: str = "INFO"
    log_format: str = "text"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_log_interval: float = 60.0
    metrics_header_timeout: float = 10.0  # seconds a connection to metrics_port may take to send a request's headers
    metrics_max_connections: int = 128  # open connections to metrics_port at most (each costs a descriptor, no thread)
    curve: CurveConfig = CurveConfig()
    allow_insecure: bool = False


@dataclass(frozen=True)
class GatewaySection:
    """The HTTP/WebSocket/Wyoming gateway the supervisor runs as a child process (``python -m hub.gateway``)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    wyoming_port: int = 0  # 0: no Wyoming server; 10300 is Home Assistant's usual port
    api_keys_file: str = ""  # one key a line; "" accepts every request (loopback only, unless allow_insecure)
    allow_insecure: bool = False
    max_upload_mb: float = 100.0
    max_concurrent_requests: int = 64
    request_timeout: float = 600.0
    wyoming_idle_timeout: float = 30.0  # a Wyoming connection silent this long with nothing in flight is closed
    header_timeout: float = 10.0  # seconds an HTTP connection may take to send a request's headers (then 408)
    max_connections: int = 1000  # open connections at most, on the HTTP port and on the Wyoming port each
    # audio in flight (uploads as read, plus their decoded PCM) at most: sized for deploy/kubernetes's 1 GiB gateway
    # container (docs/operations/kubernetes.md); beyond it an upload waits up to max_buffer_wait s, then gets 429
    max_buffered_mb: float = 512.0
    max_buffer_wait: float = 10.0
    model_aliases: dict[str, str] = field(default_factory=dict)
    client_secret_key: str = ""  # CURVE, for a hub that requires it: the gateway's own .key_secret file ...
    server_public_key: str = ""  # ... and the hub's public .key file


@dataclass(frozen=True)
class RouteTarget:
    """One provider of a route and its share of the route's requests (weights are relative)."""

    provider: str
    weight: float = 1.0


@dataclass(frozen=True)
class ShadowConfig:
    """A provider that also gets ``fraction`` of a route's requests; its answers are compared, never returned."""

    provider: str
    fraction: float = 1.0


@dataclass(frozen=True)
class AnalysisConfig:
    """When a canary is rolled back: over its last ``min_requests`` requests (and the baseline's), an error
    rate above the baseline's by more than ``max_error_rate_increase``, a p95 time on the worker above
    ``max_latency_ratio`` times the baseline's, or a mean agreement WER with the primary above ``max_wer``."""

    min_requests: int = 200
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    max_wer: float = 0.15


def baseline_of(weights: dict[str, float], order: tuple[str, ...]) -> str:
    """The provider canaries are compared with: the heaviest weight, the first listed on a tie."""
    return max(order, key=lambda p: (weights.get(p, 0.0), -order.index(p)))


@dataclass(frozen=True)
class RouteConfig:
    """A public model name served by weighted providers (a gray release), perhaps with a shadow and an analysis."""

    name: str
    providers: tuple[RouteTarget, ...]
    shadow: ShadowConfig | None = None
    sticky: bool = False
    analysis: AnalysisConfig | None = None

    @property
    def weights(self) -> dict[str, float]:
        return {t.provider: t.weight for t in self.providers}


@dataclass(frozen=True)
class HubConfig:
    hub: HubSection
    providers: dict[str, ProviderConfig]
    gateway: GatewaySection = GatewaySection()
    routes: dict[str, RouteConfig] = field(default_factory=dict)

    @property
    def enabled_providers(self) -> list[ProviderConfig]:
        return [p for p in self.providers.values() if p.enabled]

    def resolved_runtime_dir(self) -> Path:
        """Where the backend socket lives: ``hub.runtime_dir``, else ``$XDG_RUNTIME_DIR/asr-hub``, else /tmp."""
        if self.hub.runtime_dir:
            return Path(self.hub.runtime_dir)
        if os.environ.get("XDG_RUNTIME_DIR"):
            return Path(os.environ["XDG_RUNTIME_DIR"]) / "asr-hub"
        return Path(f"/tmp/asr-hub-{os.getuid()}")


def hub_id(frontend: str) -> str:
    """A hub's id follows from its frontend address: two live hubs never share one, and a hub restarted
    on the same address keeps its shared-memory prefix, so connected clients carry on unaffected."""
    return hashlib.sha1(frontend.encode()).hexdigest()[:8]


def pid_file(config: HubConfig) -> Path:
    """Where the supervisor serving ``config`` writes its pid (for scripts that signal it)."""
    return config.resolved_runtime_dir() / f"{hub_id(config.hub.frontend)}.pid"


def load_config(path: str | os.PathLike[str]) -> HubConfig:
    """Read and validate a config file; raise ``ConfigError`` naming the offending key path."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data or {}, base_dir=Path(path).resolve().parent)


def parse_config(data: Any, base_dir: Path | None = None, check_paths: bool = True) -> HubConfig:
    """Validate an already-parsed mapping (what ``yaml.safe_load`` returned). ``check_paths=False``
    skips the checks that depend on this machine's files (model directories, key files), for
    validating a config meant for another machine."""
    root = _mapping(data, "config")
    _reject_unknown(root, {"hub", "providers", "gateway", "routes"}, "")
    hub = _build(HubSection, _mapping(root.get("hub") or {}, "hub"), "hub")
    if hub.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"hub.log_level: must be one of {', '.join(LOG_LEVELS)}, got {hub.log_level!r}")
    if hub.log_format not in LOG_FORMATS:
        raise ConfigError(f"hub.log_format: must be one of {', '.join(LOG_FORMATS)}, got {hub.log_format!r}")
    if not 0 <= hub.metrics_port <= 65535:
        raise ConfigError(
            f"hub.metrics_port: must be a TCP port (0 turns the HTTP endpoint off), got {hub.metrics_port}"
        )
    if hub.metrics_header_timeout <= 0 or hub.metrics_max_connections < 1:
        raise ConfigError(
            "hub: metrics_header_timeout must be a positive number of seconds and metrics_max_connections at least 1, "
            f"got {hub.metrics_header_timeout:g} and {hub.metrics_max_connections}"
        )
    if check_paths:
        hub = dataclasses.replace(hub, curve=_check_curve(hub.curve, base_dir))
    check_exposure(hub)
    raw_providers = _mapping(root.get("providers") or {}, "providers")
    providers = {
        name: _provider(str(name), _mapping(body or {}, f"providers.{name}"), base_dir, check_paths)
        for name, body in raw_providers.items()
    }
    raw_routes = _mapping(root.get("routes") or {}, "routes")
    routes = {str(name): _route(str(name), body, providers) for name, body in raw_routes.items()}
    gateway = _gateway(root.get("gateway"), base_dir, check_paths)
    config = HubConfig(hub=hub, providers=providers, gateway=gateway, routes=routes)
    if not config.enabled_providers:
        raise ConfigError("providers: at least one provider must be enabled")
    if config.gateway.enabled and hub.curve.enabled and not config.gateway.client_secret_key:
        raise ConfigError(
            "gateway: the hub requires CURVE keys (hub.curve), so the gateway needs its own: set "
            "gateway.client_secret_key (a key pair from python -m hub.keys, its public key in hub.curve.allowed_clients) "
            "and gateway.server_public_key (the hub's public .key file)"
        )
    check_gateway_budget(config.gateway, hub)
    for alias, target in config.gateway.model_aliases.items():
        if target not in config.providers and target not in config.routes:
            raise ConfigError(f"gateway.model_aliases.{alias}: no provider or route named {target!r}")
    return config


def _route(name: str, body: Any, providers: dict[str, ProviderConfig]) -> RouteConfig:
    """A route from its mapping, or from a bare list (short for its ``providers:``)."""
    path = f"routes.{name}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"{path}: route names are 1-40 lowercase letters, digits, '_', '.' or '-'")
    if isinstance(body, list):
        body = {"providers": body}
    body = _mapping(body, path)
    if "providers" not in body:
        raise ConfigError(f"{path}.providers: required (a list of {{provider: NAME, weight: N}})")
    route = _build(RouteConfig, body, path, fixed={"name": name})
    if not route.providers:
        raise ConfigError(f"{path}.providers: give at least one provider")
    for i, target in enumerate(route.providers):
        _route_provider(target.provider, providers, f"{path}.providers[{i}].provider")
        if target.weight < 0:
            raise ConfigError(f"{path}.providers[{i}].weight: must be >= 0, got {target.weight:g}")
    if len(route.weights) != len(route.providers):
        raise ConfigError(f"{path}.providers: a provider is listed twice")
    if sum(route.weights.values()) <= 0:
        raise ConfigError(f"{path}.providers: the weights must add up to more than 0")
    if name in providers and name not in route.weights:
        raise ConfigError(
            f"{path}: {name!r} is also a provider's name; a route may take a provider's name only when it "
            "routes to that provider (requests for the name then go through the route)"
        )
    if route.shadow is not None:
        _route_provider(route.shadow.provider, providers, f"{path}.shadow.provider")
        if not 0 < route.shadow.fraction <= 1:
            raise ConfigError(f"{path}.shadow.fraction: must be in (0, 1], got {route.shadow.fraction:g}")
    analysis = route.analysis
    if analysis is not None:
        if analysis.min_requests < 1:
            raise ConfigError(f"{path}.analysis.min_requests: must be at least 1, got {analysis.min_requests}")
        for key in ("max_error_rate_increase", "max_latency_ratio", "max_wer"):
            if getattr(analysis, key) < 0:
                raise ConfigError(f"{path}.analysis.{key}: must be >= 0, got {getattr(analysis, key):g}")
    return route


def _route_provider(name: str, providers: dict[str, ProviderConfig], path: str) -> None:
    provider = providers.get(name)
    if provider is None:
        raise ConfigError(f"{path}: no provider named {name!r} (known: {', '.join(providers)})")
    if not provider.enabled:
        raise ConfigError(f"{path}: provider {name!r} is disabled (providers.{name}.enabled)")


def _gateway(data: Any, base_dir: Path | None, check_paths: bool) -> GatewaySection:
    gateway = _build(GatewaySection, _mapping(data or {}, "gateway"), "gateway")
    for key in ("port", "wyoming_port"):
        if not 0 <= getattr(gateway, key) <= 65535:
            raise ConfigError(f"gateway.{key}: must be a TCP port (0 turns it off), got {getattr(gateway, key)}")
    positive = (
        "max_upload_mb", "max_concurrent_requests", "request_timeout", "wyoming_idle_timeout", "header_timeout",
        "max_connections", "max_buffered_mb",
    )  # fmt: skip
    if min(getattr(gateway, key) for key in positive) <= 0:
        raise ConfigError(f"gateway: {', '.join(positive)} must be positive")
    if gateway.max_buffer_wait < 0:
        raise ConfigError(
            f"gateway.max_buffer_wait: must be >= 0 seconds (0: refuse at once), got {gateway.max_buffer_wait:g}"
        )
    if bool(gateway.client_secret_key) != bool(gateway.server_public_key):
        raise ConfigError("gateway: give both client_secret_key and server_public_key (CURVE keys), or neither")
    for key in ("api_keys_file", "client_secret_key", "server_public_key"):
        if getattr(gateway, key):
            path = _resolve(getattr(gateway, key), base_dir)
            if check_paths and not path.is_file():
                raise ConfigError(f"gateway.{key}: {str(path)!r} is not a file")
            gateway = dataclasses.replace(gateway, **{key: str(path)})
    check_gateway_exposure(gateway)
    return gateway


def check_gateway_budget(gateway: GatewaySection, hub: HubSection) -> None:
    """The largest upload the gateway accepts must fit its memory budget, or it would wait for ever."""
    largest = upload_peak_bytes(int(gateway.max_upload_mb * 2**20), hub.max_audio_seconds) / 2**20
    if gateway.max_buffered_mb < largest:
        raise ConfigError(
            f"gateway.max_buffered_mb: {gateway.max_buffered_mb:g} MB cannot hold one upload of max_upload_mb "
            f"({gateway.max_upload_mb:g} MB) and its decoded audio ({largest:.0f} MB in all): raise it or lower max_upload_mb"
        )


def check_gateway_exposure(gateway: GatewaySection) -> None:
    """A gateway other machines can reach needs API keys, unless the operator opts out explicitly; Wyoming has
    no authentication at all, so exposing it always takes the explicit opt-out."""
    if is_loopback(f"tcp://{gateway.host}:0") or gateway.allow_insecure:
        return
    if gateway.wyoming_port:
        raise ConfigError(
            f"gateway.host: {gateway.host} can be reached from other machines, and the Wyoming protocol "
            f"(gateway.wyoming_port {gateway.wyoming_port}) has no authentication. Keep that port on a trusted "
            "network and set gateway.allow_insecure: true, or set wyoming_port: 0"
        )
    if gateway.api_keys_file:
        return
    raise ConfigError(
        f"gateway.host: {gateway.host} can be reached from other machines, and anyone who connects could use "
        "the hub. Set gateway.api_keys_file (one key a line; clients send 'Authorization: Bearer KEY'), "
        "or set gateway.allow_insecure: true to accept that"
    )


def is_loopback(endpoint: str) -> bool:
    """True for endpoints no other machine can reach: ipc, inproc, and tcp on a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def loopback_endpoint(frontend: str) -> str:
    """Where a client on the hub's own host connects: a wildcard bind address becomes loopback."""
    scheme, _, rest = frontend.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and host in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{port}"
    if scheme == "tcp" and host in ("[::]", "::"):
        return f"tcp://[::1]:{port}"
    return frontend


def check_exposure(hub: HubSection) -> None:
    """A frontend other machines can reach needs CURVE keys, unless the operator opts out explicitly."""
    if is_loopback(hub.frontend) or hub.curve.enabled or hub.allow_insecure:
        return
    raise ConfigError(
        f"hub.frontend: {hub.frontend} can be reached from other machines, and anyone who connects could use "
        "the hub. Set hub.curve.server_secret_key and hub.curve.allowed_clients (make them with "
        "`python -m hub.keys`), or set hub.allow_insecure: true to accept that"
    )


def _check_curve(curve: CurveConfig, base_dir: Path | None) -> CurveConfig:
    if not curve.server_secret_key and not curve.allowed_clients:
        return curve
    if not curve.server_secret_key or not curve.allowed_clients:
        raise ConfigError("hub.curve: give both server_secret_key and allowed_clients")
    secret = _resolve(curve.server_secret_key, base_dir)
    allowed = _resolve(curve.allowed_clients, base_dir)
    if not secret.is_file():
        raise ConfigError(
            f"hub.curve.server_secret_key: {str(secret)!r} is not a file (make one with python -m hub.keys)"
        )
    if not allowed.is_dir():
        raise ConfigError(f"hub.curve.allowed_clients: {str(allowed)!r} is not a directory of client public keys")
    return CurveConfig(server_secret_key=str(secret), allowed_clients=str(allowed))


def _resolve(path: str, base_dir: Path | None) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and base_dir is not None:
        resolved = base_dir / resolved
    return resolved.resolve()


def _provider(name: str, body: dict[str, Any], base_dir: Path | None, check_paths: bool) -> ProviderConfig:
    path = f"providers.{name}"
    if not _NAME_RE.match(name):
        raise ConfigError(f"{path}: provider names are 1-40 lowercase letters, digits, '_', '.' or '-'")
    body = dict(body)
    body.setdefault("type", name)
    pool_body = body.pop("pool", None)
    provider = _build(ProviderConfig, body, path, fixed={"name": name})
    kind = PROVIDER_TYPES.get(provider.type)
    if kind is None:
        raise ConfigError(f"{path}.type: unknown provider type {provider.type!r} (known: {', '.join(PROVIDER_TYPES)})")
    if provider.device not in DEVICES:
        raise ConfigError(f"{path}.device: must be one of {', '.join(DEVICES)}, got {provider.device!r}")
    if provider.devices is not None and (not provider.devices or any(d < 0 for d in provider.devices)):
        raise ConfigError(f"{path}.devices: give at least one GPU index, each >= 0 (or leave it out for every GPU)")
    unknown = sorted(set(provider.options) - set(kind.options))
    if unknown:
        raise ConfigError(
            f"{path}.options: {', '.join(unknown)} not understood by {provider.type} providers "
            f"(known: {', '.join(sorted(kind.options))})"
        )
    problems = kind.option_problems(provider.options)
    if problems:
        raise ConfigError(f"{path}.options: " + "; ".join(problems))
    if provider.cpu_threads < 0:
        raise ConfigError(f"{path}.cpu_threads: must be >= 0 (0 lets the library choose)")
    if provider.stream.step_ms < 100 or provider.stream.window_seconds < 2 * provider.stream.step_ms / 1000:
        raise ConfigError(f"{path}.stream: step_ms must be >= 100 and window_seconds at least two steps long")
    problems = protocol.turn_detection_problems(
        {
            "vad": provider.stream.vad,
            "endpoint_ms": provider.stream.endpoint_ms,
            "vad_threshold": provider.stream.vad_threshold,
        }
    )
    if problems:
        raise ConfigError(f"{path}.stream: " + "; ".join(problems))
    model = _check_model(provider, path, base_dir) if check_paths else provider.model
    pool = _pool(_mapping(pool_body, f"{path}.pool") if pool_body is not None else None, f"{path}.pool")
    return dataclasses.replace(provider, model=model, pool=pool)


def _check_model(provider: ProviderConfig, path: str, base_dir: Path | None) -> str:
    """A path-like model must be an existing directory (made absolute); other values are model names."""
    model = provider.model
    if not PROVIDER_TYPES[provider.type].needs_model:
        return model
    if not model:
        raise ConfigError(f"{path}.model: required for a {provider.type} provider")
    looks_like_path = model.startswith(("/", "./", "../", "~")) or os.sep in model
    if not looks_like_path:
        return model
    directory = _resolve(model, base_dir)
    if not directory.is_dir():
        raise ConfigError(f"{path}.model: model directory {str(directory)!r} does not exist")
    return str(directory)


def _pool(body: dict[str, Any] | None, path: str) -> PoolConfig:
    if body is None:
        return SINGLE_INSTANCE
    pool = _build(PoolConfig, body, path)
    if not pool.enabled:
        sessions = 1 if pool.max_sessions is None else min(pool.max_sessions, 1)
        return dataclasses.replace(
            pool,
            min_size=1,
            max_size=1,
            max_sessions=sessions,
            sessions_per_worker=1,
            max_batch=1,
            split_over_seconds=0.0,
        )
    if pool.min_size < 1:
        raise ConfigError(f"{path}.min_size: must be at least 1, got {pool.min_size}")
    if pool.min_size > pool.max_size:
        raise ConfigError(f"{path}: min_size ({pool.min_size}) is greater than max_size ({pool.max_size})")
    if pool.sessions_per_worker < 1:
        raise ConfigError(f"{path}.sessions_per_worker: must be at least 1, got {pool.sessions_per_worker}")
    most = pool.max_size * pool.sessions_per_worker
    if pool.max_sessions is not None and not 0 <= pool.max_sessions <= most:
        raise ConfigError(
            f"{path}.max_sessions: must be between 0 and max_size * sessions_per_worker ({most}), got {pool.max_sessions}"
        )
    if not 0.0 <= pool.max_gpu_memory_fraction <= 1.0:
        raise ConfigError(
            f"{path}.max_gpu_memory_fraction: must be 0 (off) or a share of a card's memory up to 1, "
            f"got {pool.max_gpu_memory_fraction:g}"
        )
    if pool.max_queue < 0:
        raise ConfigError(f"{path}.max_queue: must be >= 0, got {pool.max_queue}")
    if not 1 <= pool.max_batch <= MAX_BATCH:
        raise ConfigError(f"{path}.max_batch: must be a whole number from 1 to {MAX_BATCH}, got {pool.max_batch}")
    if not 0 <= pool.batch_wait_ms <= MAX_BATCH_WAIT_MS:
        raise ConfigError(
            f"{path}.batch_wait_ms: must be from 0 to {MAX_BATCH_WAIT_MS} milliseconds, got {pool.batch_wait_ms:g}"
        )
    for key in ("acquire_timeout", "job_timeout", "idle_timeout", "health_check_interval"):
        if getattr(pool, key) <= 0:
            raise ConfigError(f"{path}.{key}: must be a positive number of seconds")
    if pool.split_over_seconds < 0:
        raise ConfigError(
            f"{path}.split_over_seconds: must be 0 (never split) or a number of seconds, got {pool.split_over_seconds:g}"
        )
    if pool.split_piece_seconds < 1.0 or 0 < pool.split_over_seconds < pool.split_piece_seconds:
        raise ConfigError(
            f"{path}.split_piece_seconds: must be at least 1 and at most split_over_seconds "
            f"({pool.split_over_seconds:g}), so that a request it cuts has two pieces or more; got {pool.split_piece_seconds:g}"
        )
    return pool


# --- sections checked against the dataclasses (pydantic) -------------------------


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
    return value


def _reject_unknown(data: dict[str, Any], known: set[str], path: str) -> None:
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (known keys: {', '.join(sorted(known))})")


def _build(cls: type, data: dict[str, Any], path: str, fixed: dict[str, Any] | None = None) -> Any:
    """Make ``cls`` from ``data``, checking each key against the field's type; ``fixed`` fields are not keys."""
    fixed = fixed or {}
    if clash := sorted(data.keys() & fixed.keys()):
        known = sorted(_known(cls, ()) - fixed.keys())
        raise ConfigError(f"{path}.{clash[0]}: unknown key (known keys: {', '.join(known)})")
    try:
        return _schema(cls).validate_json(json.dumps({path: {**data, **fixed}}, default=_not_json(path)))[path]
    except ValidationError as exc:
        raise ConfigError(_message(cls, exc.errors()[0])) from None


def _not_json(path: str) -> Callable[[Any], Any]:
    def refuse(value: Any) -> Any:
        raise ConfigError(
            f"{path}: {_describe(value)} is not a config value (a string, number, true/false, list or mapping); "
            "quote it to make it a string"
        )

    return refuse


@functools.cache
def _schema(cls: type) -> TypeAdapter[dict[str, Any]]:
    """``cls`` as pydantic checks a config's values: JSON's types only (no "2" for 2, no "yes" for true; an
    integer is a number), no unknown keys. Checking JSON is what makes pydantic's strict mode take a mapping
    for a dataclass and a list for a tuple; a dataclass takes its config from what holds it, hence the mapping
    of one (keyed by its path, which then starts every error's location)."""
    return TypeAdapter(dict[str, cls], config=ConfigDict(strict=True, extra="forbid"))  # type: ignore[valid-type]


_EXPECTED = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dataclass_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
}


def _message(cls: type, error: Any) -> str:
    """A pydantic error as the config's: its key path, then what was wrong in words a person acts on."""
    path, *loc = error["loc"]
    where = path + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc)
    kind = error["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{where}: unknown key (known keys: {', '.join(sorted(_known(cls, tuple(loc[:-1]))))})"
    if kind == "missing":
        return f"{where}: required"
    if kind in _EXPECTED:
        return f"{where}: {_EXPECTED[kind]}, got {_describe(error['input'])}"
    return f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}, got {_describe(error['input'])}"


def _known(cls: type, loc: tuple[Any, ...]) -> set[str]:
    """The field names of the dataclass at ``loc`` (field names, list indexes, mapping keys) inside ``cls``."""
    kind: Any = cls
    for key in loc:
        if dataclasses.is_dataclass(kind):
            kind = typing.get_type_hints(kind)[key]
        else:  # a list's item, a mapping's value
            kind = typing.get_args(kind)[-1 if typing.get_origin(kind) is dict else 0]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if _optional(kind) else kind
    return {f.name for f in dataclasses.fields(kind)}


def _optional(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing"
