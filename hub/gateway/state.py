"""What every route of the gateway shares: its settings, its client of the hub (or of many hubs), keys,
metrics, the concurrency bound, the memory budget for uploads and the hubs' readiness as last seen."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from hub.client import AsyncHubClient, CurveKeys
from hub.client.balance import AsyncHubPool, needs_pool
from hub.config import GatewaySection
from hub.errors import HubError
from hub.gateway.auth import ApiKeys
from hub.gateway.budget import MemoryBudget
from hub.gateway.errors import ApiError
from hub.gateway.hubs import HubStatuses, Readiness, answered, providers, readiness
from hub.gateway.metrics import GatewayMetrics
from hub.status import HubStatus

log = logging.getLogger("hub.gateway")

DEFAULT_ALIAS = "whisper-1"  # what OpenAI's clients ask for; it means the hub's default provider
WATCH_INTERVAL = 1.0
STATUS_TIMEOUT = 2.0


@dataclass(frozen=True)
class Settings:
    """The gateway's settings: its config section, where the hubs are (``--hub``: endpoints or
    ``dns+tcp://NAME:PORT``), and the hub's audio bound."""

    hubs: tuple[str, ...]
    section: GatewaySection
    max_audio_seconds: float = 1800.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.section.max_upload_mb * 1024 * 1024)

    @property
    def where(self) -> str:
        return ", ".join(self.hubs)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        section = settings.section
        curve = (
            CurveKeys.load(section.client_secret_key, section.server_public_key) if section.client_secret_key else None
        )
        # One hub: its client, so that a refusal (draining, busy) reaches the caller at once, as a hub's own
        # answer. Many hubs: a pool, which sends each request to the hub with the most room and retries a
        # refused or lost one on another; a live session stays on the hub that opened it.
        self.client: AsyncHubClient | AsyncHubPool = (
            AsyncHubPool(settings.hubs, timeout=section.request_timeout, curve=curve)
            if needs_pool(settings.hubs)
            else AsyncHubClient(settings.hubs[0], timeout=section.request_timeout, curve=curve)
        )
        self.keys = ApiKeys(settings.section.api_keys_file)
        self.budget = MemoryBudget(int(section.max_buffered_mb * 2**20), section.max_buffer_wait)
        self.metrics = GatewayMetrics()
        self.metrics.buffered.set_function(lambda: self.budget.reserved)
        self.in_flight = 0
        self.hub_ready = False
        self.hubs_ready = 0
        self.hubs: HubStatuses = {}  # each hub's status as last polled, or the error it gave
        self.hub_problem = "no hub has answered yet"
        self._watch: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_hub())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
        await self.client.close()

    async def _watch_hub(self) -> None:
        """Poll the hubs' status: /readyz, /v1/models and Wyoming's info answer from what was seen last."""
        while True:
            self.hubs = await self._poll()
            self._set_ready(readiness(self.hubs, self.settings.where))
            await asyncio.sleep(WATCH_INTERVAL)

    async def _poll(self) -> HubStatuses:
        """Every hub's status, or ``{"error": ...}`` for one that did not answer (``AsyncHubPool.status``'s shape)."""
        if isinstance(self.client, AsyncHubPool):
            return (await self.client.status(timeout=STATUS_TIMEOUT))["hubs"]
        try:
            return {self.client.endpoint: await self.client.status(timeout=STATUS_TIMEOUT)}
        except HubError as exc:
            return {self.client.endpoint: {"error": exc.to_dict()}}

    def _set_ready(self, now: Readiness) -> None:
        if now.ready != self.hub_ready:
            log.info("hub %s", "ready" if now.ready else f"not ready: {now.problem}")
        if isinstance(self.client, AsyncHubPool) and now.hubs_ready != self.hubs_ready:
            log.info("%d of %d hubs ready", now.hubs_ready, len(self.hubs))
        self.hub_ready, self.hub_problem, self.hubs_ready = now.ready, now.problem, now.hubs_ready
        self.metrics.hub_up.set(1 if now.ready else 0)
        self.metrics.hubs_ready.set(now.hubs_ready)

    # --- what routes use ---------------------------------------------------------------

    def provider_for(self, model: str | None) -> str | None:
        """The provider a model name means: an alias, a provider's own name, or None for the hub's default."""
        if not model:
            return None
        aliases = self.settings.section.model_aliases
        if model in aliases:
            return aliases[model]
        return None if model == DEFAULT_ALIAS else model

    def models(self) -> list[dict[str, Any]]:
        """One entry per enabled provider of any hub that answered, as they last reported them."""
        return providers(self.hubs)

    def routes(self) -> list[str]:
        """The routes (public model names of a gray release) of any hub that answered, each once."""
        names = (
            name
            for entry in self.hubs.values()
            if (status := HubStatus.of(entry)) is not None
            for name in status.routes
        )
        return list(dict.fromkeys(names))

    def answered(self) -> bool:
        """Whether any hub has answered the watch yet (Wyoming's info waits for one)."""
        return any(answered(status) for status in self.hubs.values())

    def admit(self) -> Slot:
        """Take one of ``max_concurrent_requests`` slots, or refuse at once with 429."""
        limit = self.settings.section.max_concurrent_requests
        if self.in_flight >= limit:
            raise ApiError(
                "TOO_MANY_REQUESTS",
                f"the gateway is serving {self.in_flight} requests, its limit (gateway.max_concurrent_requests); "
                "retry shortly",
            )
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        return Slot(self)


class Slot:
    """One admitted request; ``release`` gives the slot back (once, however often it is called)."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway: Gateway | None = gateway

    def release(self) -> None:
        if self._gateway is not None:
            self._gateway.in_flight -= 1
            self._gateway.metrics.in_flight.set(self._gateway.in_flight)
            self._gateway = None
