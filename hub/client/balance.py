"""``HubPool`` and ``AsyncHubPool``: one client over many hubs, balancing requests, not connections.

A Kubernetes Service balances TCP connections, and a ZeroMQ connection lives long, so a
client behind one would stay pinned to one pod. The pool keeps one ``HubClient`` (or
``AsyncHubClient``) per hub and picks a hub for every request:

- hubs come from a list of endpoints and/or ``dns+tcp://NAME:PORT`` names, re-resolved every
  ``resolve_interval`` seconds (a headless Service's name lists its ready pods); a hub that
  appears is used, one that vanishes is closed once its requests and sessions are over;
- a watcher asks every hub for its status each ``probe_interval`` seconds; the hub with the
  most free workers for the request's provider (idle workers minus queued jobs, corrected by
  what this pool sent since) wins, then the one with the fewest of our requests in flight;
- ``POOL_BUSY``, ``SHUTTING_DOWN`` and ``HUB_UNREACHABLE`` send the request to another hub
  within the caller's timeout, never once any part of the answer has reached the caller; a
  live session stays on the hub that opened it.

The bookkeeping (``Balancer``: which hub) and one request's tries (``Attempts``: when to try another
hub, when to give up) do no I/O; the two pools differ only in how they wait.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hub import shm
from hub.audio import AudioInput, to_pcm
from hub.client.aio import AsyncHubClient, AsyncTranscriptStream
from hub.client.call import CurveKeys
from hub.client.sync import HubClient, TranscriptStream
from hub.errors import (
    AuthFailed,
    HubError,
    HubUnreachable,
    PoolBusy,
    ProviderUnavailable,
    ShuttingDown,
)
from hub.results import Segment, Transcript
from hub.status import HubStatus, PoolStatus, ReadyState

__all__ = ["HubPool", "AsyncHubPool", "Balancer", "needs_pool", "parse_endpoints", "system_resolver", "DNS_SCHEME"]

DNS_SCHEME = "dns+tcp://"
RETRYABLE = (PoolBusy, ShuttingDown, HubUnreachable)
RETRY_PAUSE = 0.05  # seconds to wait when every hub has refused the request once, before trying them again

Resolver = Callable[[str, int], Sequence[str]]
Client = TypeVar("Client", HubClient, AsyncHubClient)


def system_resolver(name: str, port: int) -> list[str]:
    """The addresses the system's resolver gives for ``name`` (a headless Service: one per ready pod)."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def needs_pool(endpoints: Sequence[str]) -> bool:
    """Whether these endpoints take a pool: more than one, or a DNS name (which may list many hubs)."""
    return len(endpoints) > 1 or any(e.startswith(DNS_SCHEME) for e in endpoints)


def tcp_endpoint(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


@dataclass(frozen=True)
class Endpoints:
    """What the caller gave: fixed ZeroMQ endpoints, and DNS names to resolve to ``tcp://ADDRESS:PORT``."""

    fixed: tuple[str, ...]
    names: tuple[tuple[str, int], ...]

    def resolve(self, resolver: Resolver, previous: dict[tuple[str, int], set[str]]) -> dict[tuple[str, int], set[str]]:
        """Each name's endpoints now; a name whose lookup fails keeps its last answer (a DNS hiccup is not an outage)."""
        found: dict[tuple[str, int], set[str]] = {}
        for name, port in self.names:
            try:
                found[(name, port)] = {tcp_endpoint(a, port) for a in resolver(name, port)}
            except OSError:
                found[(name, port)] = previous.get((name, port), set())
        return found


def parse_endpoints(spec: str | Sequence[str]) -> Endpoints:
    """``"tcp://a:5555"``, ``["tcp://a:5555", "tcp://b:5555"]`` or ``"dns+tcp://asr-hub-zmq:5555"`` (mixable)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("a HubPool needs at least one endpoint")
    fixed: list[str] = []
    names: list[tuple[str, int]] = []
    for item in items:
        if not item.startswith(DNS_SCHEME):
            fixed.append(item)
            continue
        name, _, port = item[len(DNS_SCHEME) :].rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(f"{item!r}: a DNS endpoint is dns+tcp://NAME:PORT")
        names.append((name, int(port)))
    return Endpoints(tuple(fixed), tuple(names))


@dataclass(frozen=True)
class Capacity:
    """What one status said of one provider: free workers (idle minus queued) and live sessions."""

    free: int
    sessions: int


def capacities(status: HubStatus) -> dict[str | None, Capacity]:
    """Per provider from a hub's status; the key ``None`` is the hub's default provider (its first enabled one)."""
    found: dict[str | None, Capacity] = {}
    for name, p in status.providers.items():
        if not p.enabled:
            continue
        pool = p.pool or PoolStatus()
        found[name] = Capacity(pool.workers_by_state.get("idle", 0) - p.queue_depth, pool.sessions)
        found.setdefault(None, found[name])
    return found


@dataclass(eq=False)
class Member(Generic[Client]):
    """One hub as the pool sees it."""

    endpoint: str
    client: Client
    in_flight: int = 0  # requests and open sessions of ours on this hub
    picks: int = 0
    down: bool = False  # unreachable until a probe answers
    draining: bool = False
    capacity: dict[str | None, Capacity] = field(default_factory=dict)
    in_flight_at_status: int = 0

    def score(self, provider: str | None) -> tuple[int, int, int]:
        """Lower is better: most free capacity (what the hub reported, less what we sent since), fewest in
        flight, least picked."""
        known = self.capacity.get(provider)
        free = known.free + self.in_flight_at_status - self.in_flight if known is not None else -self.in_flight
        return (-free, self.in_flight, self.picks)


class Balancer(Generic[Client]):
    """The pool's state without I/O: which hubs exist, which are usable, which one takes the next request."""

    def __init__(self, make_client: Callable[[str], Client]) -> None:
        self._make: Callable[[str], Client] = make_client
        self._lock = threading.Lock()
        self.members: dict[str, Member[Client]] = {}
        self.retired: list[Member[Client]] = []

    def update(self, endpoints: set[str]) -> list[Client]:
        """Add the hubs that appeared, retire those that vanished; return the clients now safe to close."""
        with self._lock:
            for endpoint in endpoints - self.members.keys():
                self.members[endpoint] = Member(endpoint, self._make(endpoint))
            for endpoint in self.members.keys() - endpoints:
                self.retired.append(self.members.pop(endpoint))
            return self._collect()

    def choose(self, provider: str | None, exclude: set[str]) -> Member[Client] | None:
        """The best usable hub not in ``exclude``, counted as in flight; None if there is none."""
        with self._lock:
            usable = [m for m in self.members.values() if not (m.down or m.draining or m.endpoint in exclude)]
            if not usable:
                return None
            best = min(usable, key=lambda m: m.score(provider))
            best.in_flight += 1
            best.picks += 1
            return best

    def hold(self, member: Member[Client]) -> bool:
        """Count a probe as in flight, so the client is not closed under it; False if it is closed already."""
        with self._lock:
            live = self.members.get(member.endpoint) is member or any(m is member for m in self.retired)
            member.in_flight += live
            return live

    def release(self, member: Member[Client]) -> list[Client]:
        with self._lock:
            member.in_flight -= 1
            return self._collect()

    def failed(self, member: Member[Client], exc: HubError) -> list[Client]:
        """A request was refused or lost: keep away from this hub until a probe says it serves again. A hub
        found unreachable gets a fresh client, so a new supervisor at the same address gets a new HELLO."""
        with self._lock:
            member.draining = member.draining or isinstance(exc, ShuttingDown)
            if isinstance(exc, HubUnreachable) and not member.down and self.members.get(member.endpoint) is member:
                replacement = Member(member.endpoint, self._make(member.endpoint), down=True)
                self.members[member.endpoint] = replacement
                self.retired.append(member)
            return self._collect()

    def probed(self, member: Member[Client], answer: dict[str, Any] | None) -> None:
        """What a probe found: a status, or None when the hub did not answer in time."""
        with self._lock:
            if answer is None:
                member.down = True
                return
            status = HubStatus.from_dict(answer)
            member.down = False
            member.draining = status.readiness is ReadyState.DRAINING
            member.capacity = capacities(status)
            member.in_flight_at_status = member.in_flight

    def snapshot(self) -> list[Member[Client]]:
        with self._lock:
            return list(self.members.values())

    def close_all(self) -> list[Client]:
        with self._lock:
            clients = [m.client for m in list(self.members.values()) + self.retired]
            self.members.clear()
            self.retired.clear()
            return clients

    def _collect(self) -> list[Client]:
        done = [m for m in self.retired if m.in_flight <= 0]
        self.retired = [m for m in self.retired if m.in_flight > 0]
        return [m.client for m in done]


@dataclass(eq=False)
class Attempts(Generic[Client]):
    """One request's tries over the hubs of a pool, without I/O: which hub to try next, how long to wait when
    every hub has refused it once, whether a failed try is tried again elsewhere, what to raise when time is up.

    ``Call`` is the model: the attempts say what to do, a transport (``HubPool`` sleeps, ``AsyncHubPool``
    awaits) only waits and calls. Every request shape of both pools (a transcription, a stream of segments, a
    live session) is driven the same way::

        while True:
            hub = attempts.next(now)                 # a Member to try, or seconds to wait; raises when time is up
            ... call hub.client with attempts.left(now) seconds, pass its events on ...
            attempts.answered()                      # after each event that reached the caller
            # if the call raised: retry, done = attempts.failed(exc); close done; raise unless retry
            # if it ended: close attempts.succeeded(); stop

    ``POOL_BUSY``, ``SHUTTING_DOWN`` and ``HUB_UNREACHABLE`` are tried on another hub, never once part of the
    answer has reached the caller. So is ``AUTH_FAILED`` (a hub that stops in the middle of a first handshake
    can look like one refusing the client), but only on hubs not tried yet: when every hub has refused the
    client's key, that is final at once. The methods that end a try return the clients the balancer found safe to
    close. With ``keep`` (a live session), a try that succeeded stays counted on its hub until the session ends.
    """

    balancer: Balancer[Client]
    provider: str | None
    started: float
    deadline: float
    where: str  # the pool's endpoints, for the error when no hub took the request
    keep: bool = False
    member: Member[Client] | None = None  # the hub of the try in progress (or of the kept session)
    tried: set[str] = field(default_factory=set)
    last: HubError | None = None
    has_answered: bool = False
    refusals: set[str] = field(default_factory=set)  # hubs that refused the client in the handshake

    def left(self, now: float) -> float:
        return max(0.0, self.deadline - now)

    def next(self, now: float) -> Member[Client] | float:
        """The hub to try now (counted in flight on it), or the seconds to wait before asking again when every
        usable hub has refused once (they are then all tried again). Raises the last refusal, or
        ``HubUnreachable``, once the deadline has passed."""
        left = self.deadline - now
        if left <= 0:
            raise (
                self.last
                if self.last is not None
                else HubUnreachable(
                    f"no hub of the pool ({self.where}) took the request within {now - self.started:.1f} s"
                )
            )
        self.member = self.balancer.choose(self.provider, self.tried)
        if self.member is None:
            if self.tried and self.tried <= self.refusals:
                assert self.last is not None
                raise self.last  # every hub refused the client's key: no other hub, and no wait, changes that
            self.tried.clear()
            return min(RETRY_PAUSE, left)
        return self.member

    def answered(self) -> None:
        """Part of the answer reached the caller: from now on a failure is final."""
        self.has_answered = True

    def failed(self, exc: BaseException) -> tuple[bool, list[Client]]:
        """The try raised ``exc``: whether to try another hub (else re-raise it), and the clients to close."""
        member = self._take()
        retry = isinstance(exc, (*RETRYABLE, AuthFailed)) and not self.has_answered
        closable = []
        if retry:
            assert isinstance(exc, HubError)
            self.last = exc
            self.tried.add(member.endpoint)
            if isinstance(exc, AuthFailed):
                self.refusals.add(member.endpoint)
            closable = self.balancer.failed(member, exc)
        return retry, closable + self.balancer.release(member)

    def succeeded(self) -> list[Client]:
        """The try ended well; its hub is let go of, unless it keeps a live session."""
        if self.keep:
            return []
        return self.balancer.release(self._take())

    def _take(self) -> Member[Client]:
        member, self.member = self.member, None
        assert member is not None, "no try in progress"
        return member


class _Pool(Generic[Client]):
    """What both pools share: the constructor, endpoints, resolving on schedule, the balancer."""

    client_class: type[Client]  # HubClient or AsyncHubClient: one per hub

    def __init__(
        self,
        endpoints: str | Sequence[str],
        timeout: float = 60.0,
        *,
        use_shm: bool = True,
        curve: CurveKeys | None = None,
        resolve_interval: float = 5.0,
        probe_interval: float = 1.0,
        resolver: Resolver = system_resolver,
    ) -> None:
        """``timeout`` is each request's default; ``use_shm`` and ``curve`` apply to every hub's client (the hubs
        of one pool share one CURVE server key, as the pods of one Deployment share one Secret)."""
        self.endpoints = parse_endpoints(endpoints)
        self.timeout = timeout
        self.resolve_interval = resolve_interval
        self.probe_interval = probe_interval
        self.probe_timeout = max(0.5, min(2.0, probe_interval * 2))
        self._resolver = resolver
        self._resolved: dict[tuple[str, int], set[str]] = {}
        self._next_resolve = 0.0
        make_client = functools.partial(self.client_class, timeout=timeout, use_shm=use_shm, curve=curve)
        self.balancer: Balancer[Client] = Balancer(make_client)
        self._begin()

    def _begin(self) -> None:
        """What each pool sets up once it is built (the blocking pool starts its watcher thread here)."""
        raise NotImplementedError

    def _attempts(self, provider: str | None, timeout: float | None, keep: bool = False) -> Attempts[Client]:
        """A request's tries, its deadline ``timeout`` (else the pool's) from now."""
        now = time.monotonic()
        where = ", ".join([*self.endpoints.fixed, *(f"{DNS_SCHEME}{n}:{p}" for n, p in self.endpoints.names)])
        return Attempts(self.balancer, provider, now, now + (timeout or self.timeout), where, keep)

    def _due_endpoints(self, now: float) -> set[str] | None:
        """The endpoints to use, when a resolve is due (always the first time); None otherwise."""
        if now < self._next_resolve:
            return None
        self._next_resolve = now + self.resolve_interval
        self._resolved = self.endpoints.resolve(self._resolver, self._resolved)
        return set(self.endpoints.fixed).union(*self._resolved.values())


class HubPool(_Pool[HubClient]):
    """A blocking client over many hubs; thread-safe, like ``HubClient``. ``close()`` (or ``with``) when done."""

    client_class = HubClient

    def _begin(self) -> None:
        self._stop = threading.Event()
        self._refresh()
        self._watcher = threading.Thread(target=self._watch, name="hubpool-watch", daemon=True)
        self._watcher.start()

    def __enter__(self) -> HubPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._watcher.join()
        _close(self.balancer.close_all())

    def transcribe(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> Transcript:
        """``HubClient.transcribe`` on the hub with the most room, retried elsewhere if refused or lost."""
        pcm = to_pcm(audio, sample_rate)

        def call(client: HubClient, left: float) -> list[Transcript]:
            return [client.transcribe(pcm, provider, timeout=left, **options)]

        (transcript,) = self._tries(self._attempts(provider, timeout), call)
        return transcript

    def transcribe_stream(
        self,
        audio: AudioInput,
        provider: str | None = None,
        *,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> TranscriptStream:
        """Segments as they are decoded; retried on another hub only until the first one arrives."""
        pcm = to_pcm(audio, sample_rate)

        def call(client: HubClient, left: float) -> Iterator[Segment | Transcript]:
            stream = client.transcribe_stream(pcm, provider, timeout=left, **options)
            yield from stream
            assert stream.transcript is not None
            yield stream.transcript

        return TranscriptStream(self._tries(self._attempts(provider, timeout), call))

    def open_stream(self, provider: str | None = None, *, timeout: float | None = None, **options: Any) -> Any:
        """A live session on the hub with the most room; it stays there until closed."""
        attempts = self._attempts(provider, timeout, keep=True)

        def call(client: HubClient, left: float) -> list[Any]:
            return [client.open_stream(provider, timeout=left, **options)]

        (session,) = self._tries(attempts, call)
        member = attempts.member
        assert member is not None
        return _PooledSession(session, lambda: _close(self.balancer.release(member)))

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"hubs": {endpoint: status}}``; a hub that did not answer has ``{"error": {code, message}}``."""
        answers = {m.endpoint: self._ask(m, timeout or self.probe_timeout) for m in self.balancer.snapshot()}
        return {"hubs": {endpoint: _entry(answer) for endpoint, answer in answers.items() if answer is not None}}

    def wait_ready(self, timeout: float = 60.0, *, hubs: int = 1) -> dict[str, Any]:
        """Block until at least ``hubs`` hubs are ready; return the pool's status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if _ready_count(status) >= hubs:
                return status
            if time.monotonic() >= deadline:
                raise _not_enough(status, hubs, timeout)
            time.sleep(0.1)

    def _tries(
        self, attempts: Attempts[HubClient], call: Callable[[HubClient, float], Iterable[Any]]
    ) -> Generator[Any, None, None]:
        """What ``call`` on one hub yields, that hub chosen and changed as ``attempts`` say; sleeps between."""
        while True:
            hub = attempts.next(time.monotonic())
            if not isinstance(hub, Member):
                time.sleep(hub)
                continue
            try:
                for event in call(hub.client, attempts.left(time.monotonic())):
                    attempts.answered()
                    yield event
            except BaseException as exc:
                retry, closable = attempts.failed(exc)
                _close(closable)
                if not retry:
                    raise
            else:
                _close(attempts.succeeded())
                return

    def _refresh(self) -> None:
        endpoints = self._due_endpoints(time.monotonic())
        if endpoints is not None:
            _close(self.balancer.update(endpoints))

    def _watch(self) -> None:
        """Resolve when due and probe every hub, each ``probe_interval``, until closed."""
        while not self._stop.wait(self.probe_interval):
            self._refresh()
            for member in self.balancer.snapshot():
                answer = self._ask(member, self.probe_timeout)
                if answer is not None:
                    self.balancer.probed(member, answer if isinstance(answer, dict) else None)

    def _ask(self, member: Member[HubClient], timeout: float) -> dict[str, Any] | HubError | None:
        """The hub's status, or the error it gave; None when its client was closed meanwhile."""
        if not self.balancer.hold(member):
            return None
        try:
            return member.client.status(timeout=timeout)
        except HubError as exc:
            return exc
        finally:
            _close(self.balancer.release(member))


class AsyncHubPool(_Pool[AsyncHubClient]):
    """The coroutine twin of ``HubPool``, over ``AsyncHubClient``s; the gateway fronts many hubs with it."""

    client_class = AsyncHubClient

    def _begin(self) -> None:
        self._watcher: asyncio.Task[None] | None = None  # started on first use: it needs the running loop
        self._closing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AsyncHubPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.balancer.close_all()))

    async def pcm_buffer(self, capacity: int, timeout: float | None = None) -> shm.PcmBuffer:
        """Like ``AsyncHubClient.pcm_buffer``, in process memory: which hub (whose shared memory) serves the
        request is chosen when it is sent, so its samples are copied then."""
        return shm.PcmBuffer(capacity, None)

    async def transcribe(
        self,
        audio: AudioInput | shm.PcmBuffer,
        provider: str | None = None,
        *,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> Transcript:
        pcm = _pcm(audio, sample_rate)

        def call(client: AsyncHubClient, left: float) -> AsyncIterator[Transcript]:
            return _once(client.transcribe(pcm, provider, timeout=left, **options))

        (transcript,) = [event async for event in self._tries(self._attempts(provider, timeout), call)]
        return transcript

    def transcribe_stream(
        self,
        audio: AudioInput | shm.PcmBuffer,
        provider: str | None = None,
        *,
        timeout: float | None = None,
        sample_rate: int | None = None,
        **options: Any,
    ) -> AsyncTranscriptStream:
        """Yields each ``Segment``, then the ``Transcript`` (kept as ``transcript`` too, as on one hub's stream);
        retried on another hub only before the first one."""
        pcm = _pcm(audio, sample_rate)

        def call(client: AsyncHubClient, left: float) -> AsyncIterator[Segment | Transcript]:
            return client.transcribe_stream(pcm, provider, timeout=left, **options)

        return AsyncTranscriptStream(self._tries(self._attempts(provider, timeout), call))

    async def open_stream(self, provider: str | None = None, *, timeout: float | None = None, **options: Any) -> Any:
        """A live session on the hub with the most room; it stays there until closed."""
        attempts = self._attempts(provider, timeout, keep=True)

        def call(client: AsyncHubClient, left: float) -> AsyncIterator[Any]:
            return _once(client.open_stream(provider, timeout=left, **options))

        (session,) = [s async for s in self._tries(attempts, call)]
        assert attempts.member is not None
        return _AsyncPooledSession(session, functools.partial(self._end_session, attempts.member))

    async def _tries(
        self, attempts: Attempts[AsyncHubClient], call: Callable[[AsyncHubClient, float], AsyncIterator[Any]]
    ) -> AsyncGenerator[Any, None]:
        """What ``call`` on one hub yields, that hub chosen and changed as ``attempts`` say; awaits between."""
        self._start()
        while True:
            hub = attempts.next(time.monotonic())
            if not isinstance(hub, Member):
                await asyncio.sleep(hub)
                continue
            try:
                async for event in call(hub.client, attempts.left(time.monotonic())):
                    attempts.answered()
                    yield event
            except BaseException as exc:
                retry, closable = attempts.failed(exc)
                self._close(closable)
                if not retry:
                    raise
            else:
                self._close(attempts.succeeded())
                return

    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        """``{"hubs": {endpoint: status}}``; a hub that did not answer has ``{"error": {code, message}}``."""
        self._start()
        members = self.balancer.snapshot()
        answers = await asyncio.gather(*(self._ask(m, timeout or self.probe_timeout) for m in members))
        return {"hubs": {m.endpoint: _entry(a) for m, a in zip(members, answers, strict=False) if a is not None}}

    async def wait_ready(self, timeout: float = 60.0, *, hubs: int = 1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if _ready_count(status) >= hubs:
                return status
            if time.monotonic() >= deadline:
                raise _not_enough(status, hubs, timeout)
            await asyncio.sleep(0.1)

    def _start(self) -> None:
        """Resolve and start the watcher on first use (it needs the running loop)."""
        if self._watcher is None:
            self._refresh()
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _refresh(self) -> None:
        endpoints = self._due_endpoints(time.monotonic())
        if endpoints is not None:
            self._close(self.balancer.update(endpoints))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            self._refresh()
            members = self.balancer.snapshot()
            answers = await asyncio.gather(*(self._ask(m, self.probe_timeout) for m in members))
            for member, answer in zip(members, answers, strict=False):
                if answer is not None:
                    self.balancer.probed(member, answer if isinstance(answer, dict) else None)

    async def _ask(self, member: Member[AsyncHubClient], timeout: float) -> dict[str, Any] | HubError | None:
        """The hub's status, or the error it gave; None when its client was closed meanwhile."""
        if not self.balancer.hold(member):
            return None
        try:
            return await member.client.status(timeout=timeout)
        except HubError as exc:
            return exc
        finally:
            self._close(self.balancer.release(member))

    def _end_session(self, member: Member[AsyncHubClient]) -> None:
        self._close(self.balancer.release(member))

    def _close(self, clients: list[AsyncHubClient]) -> None:
        for client in clients:
            task = asyncio.get_running_loop().create_task(client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


def _pcm(audio: AudioInput | shm.PcmBuffer, sample_rate: int | None) -> Any:
    """The samples once, for every hub the request may try."""
    return to_pcm(audio.samples() if isinstance(audio, shm.PcmBuffer) else audio, sample_rate)


async def _once(result: Awaitable[Any]) -> AsyncIterator[Any]:
    yield await result


def _entry(answer: dict[str, Any] | HubError) -> dict[str, Any]:
    return {"error": answer.to_dict()} if isinstance(answer, HubError) else answer


def _close(clients: list[HubClient]) -> None:
    for client in clients:
        client.close()


def _answers(status: dict[str, Any]) -> dict[str, HubStatus | None]:
    """Each hub's status in a pool's status, None for a hub that did not answer."""
    return {endpoint: HubStatus.of(entry) for endpoint, entry in status["hubs"].items()}


def _ready_count(status: dict[str, Any]) -> int:
    return sum(1 for s in _answers(status).values() if s is not None and s.ready)


def _not_enough(status: dict[str, Any], hubs: int, timeout: float) -> HubError:
    answers = _answers(status)
    seen = ", ".join(
        f"{e}: {status['hubs'][e]['error']['code'] if s is None else s.readiness.value}" for e, s in answers.items()
    )
    if not any(s is not None for s in answers.values()):
        return HubUnreachable(f"no hub of the pool answered within {timeout:.0f} s ({seen or 'no hub resolved'})")
    return ProviderUnavailable(f"fewer than {hubs} hub(s) of the pool were ready within {timeout:.0f} s ({seen})")


class _PooledSession:
    """A live session that tells the pool when it ends, so its hub's client is not closed under it."""

    def __init__(self, session: Any, done: Callable[[], None]) -> None:
        self._session = session
        self._done: Callable[[], None] | None = done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def close(self) -> Transcript:
        try:
            return self._session.close()
        finally:
            self._finish()

    def __enter__(self) -> _PooledSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._session.__exit__(*exc)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._done is not None:
            done, self._done = self._done, None
            done()


class _AsyncPooledSession(_PooledSession):
    async def close(self) -> Transcript:  # type: ignore[override]
        try:
            return await self._session.close()
        finally:
            self._finish()

    async def __aenter__(self) -> _AsyncPooledSession:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._session.__aexit__(*exc)
        finally:
            self._finish()
