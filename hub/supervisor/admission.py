"""Admission: what a client's TRANSCRIBE or STREAM_OPEN must pass, and the job it becomes.

The checks raise the error the client gets (``UNKNOWN_PROVIDER``, ``PROVIDER_UNAVAILABLE``,
``POOL_BUSY`` at the session limit, ``INVALID_AUDIO`` for another hub's segment); the builders
turn a parsed message into a ``Job``. No sockets and no clock of their own: ``Farm.admit``
calls them with what it knows and places the job they return.
"""

from __future__ import annotations

import logging

from hub import protocol, shm
from hub.config import HubConfig, ProviderConfig
from hub.errors import (
    BadRequest,
    InvalidAudio,
    PoolBusy,
    ProviderUnavailable,
    UnknownProvider,
)
from hub.protocol import AudioRef, Message
from hub.resume import AudioTail
from hub.supervisor.jobs import Job, JobKind, acquire_deadline
from hub.supervisor.pool import ProviderPool

log = logging.getLogger("hub.supervisor")


def provider_for(config: HubConfig, pools: dict[str, ProviderPool], name: object, now: float) -> ProviderConfig:
    """The provider a request names (the config's first when it names none), if it can serve now."""
    name = name or config.enabled_providers[0].name
    if not isinstance(name, str):
        raise BadRequest("field 'provider' must be a provider name")
    provider = config.providers.get(name)
    if provider is None:
        known = ", ".join(p.name for p in config.enabled_providers)
        raise UnknownProvider(f"no provider named {name!r}; this hub serves: {known}")
    if not provider.enabled:
        raise ProviderUnavailable(f"provider {name!r} is disabled in the config (providers.{name}.enabled)")
    pool = pools[name]
    if pool.size == 0 and pool.load_failures:
        wait = max(0.0, pool.next_spawn_at - now)
        raise ProviderUnavailable(
            f"provider {name!r} has no live worker: {pool.last_error} (next start in {wait:.0f} s)"
        )
    return provider


def check_session_room(provider: ProviderConfig, active: int) -> None:
    """At most ``pool.max_sessions`` live sessions per provider: the rest of the pool is kept for one-shot jobs."""
    limit = provider.pool.session_limit
    if active >= limit:
        raise PoolBusy(
            f"provider {provider.name!r} has {active} live session(s), its limit (pool.max_sessions={limit}); "
            "the rest of the pool is kept for one-shot jobs"
        )


def own_segment(name: str, shm_prefix: str) -> None:
    """A client may only hand over shared memory named for this hub (it removes what it owns)."""
    if not name.startswith(shm_prefix):
        raise InvalidAudio(f"shared-memory segment {name!r} is not one of this hub's ({shm_prefix}*)")


def _job(
    job_id: str,
    kind: JobKind,
    client: bytes,
    msg: Message,
    provider: ProviderConfig,
    route: str,
    now: float,
    **fields: object,
) -> Job:
    """What every client's job has in common: who asked, the provider, the options, the deadlines."""
    timeout = protocol.parse_timeout(msg.body)
    return Job(
        id=job_id,
        kind=kind,
        client=client,
        request_id=msg.id,
        provider=provider.name,
        options=protocol.parse_options(msg.body),
        received_at=now,
        acquire_deadline=acquire_deadline(provider.pool, now, timeout),
        client_timeout=timeout,
        route=route,
        **fields,  # type: ignore[arg-type]
    )


def request_job(
    job_id: str,
    client: bytes,
    msg: Message,
    provider: ProviderConfig,
    route: str,
    config: HubConfig,
    shm_prefix: str,
    now: float,
) -> Job:
    """A TRANSCRIBE: its audio (inline, or a segment of this hub's), its options, whether it streams segments."""
    audio = protocol.parse_audio_ref(
        msg.body, msg.payload, max_samples=int(config.hub.max_audio_seconds * protocol.SAMPLE_RATE)
    )
    if audio.shm is not None:
        own_segment(audio.shm, shm_prefix)
    stream = bool(msg.body.get("stream", False))
    return _job(
        job_id, JobKind.REQUEST, client, msg, provider, route, now, audio=audio, payload=msg.payload, stream=stream
    )


def session_job(
    job_id: str, client: bytes, msg: Message, provider: ProviderConfig, route: str, shm_prefix: str, now: float
) -> Job:
    """A STREAM_OPEN: a live session, its audio in the client's ring or, inline, kept by the supervisor for a resume."""
    ring = protocol.parse_ring(msg.body)
    if ring is not None:
        own_segment(ring.shm, shm_prefix)
    turns = protocol.parse_turn_detection(msg.body)
    job = _job(
        job_id,
        JobKind.SESSION,
        client,
        msg,
        provider,
        route,
        now,
        audio=AudioRef(samples=0),
        payload=None,
        stream=True,
        ring=ring,
        turns=turns,
    )
    job.last_activity = now
    if ring is None:  # inline chunks: the supervisor keeps the recent ones, for a resume on another worker
        job.tail = AudioTail(int(provider.stream.window_seconds * protocol.SAMPLE_RATE))
    return job


def shadow_job(job_id: str, primary: Job, provider: str, shm_prefix: str, now: float) -> Job | None:
    """A copy of ``primary`` for the route's shadow: the same inline bytes, or a second name for the client's
    segment (None when that segment is already gone)."""
    audio = primary.audio
    if audio.shm is not None:
        try:
            audio = AudioRef(samples=audio.samples, shm=shm.share(audio.shm, shm_prefix))
        except InvalidAudio as exc:
            log.debug("shadow of job %s dropped: %s", primary.id, exc)
            return None
    return Job(
        id=job_id,
        kind=JobKind.SHADOW,
        client=b"",
        request_id="",
        provider=provider,
        audio=audio,
        payload=primary.payload,
        options=primary.options,
        stream=False,
        received_at=now,
        acquire_deadline=now,
        client_timeout=None,
        route=primary.route,
    )
