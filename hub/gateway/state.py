"""What every route of the gateway shares: its settings, the one hub client, keys, metrics, the
concurrency bound and the hub's readiness as last seen."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from hub.client import AsyncHubClient, CurveKeys
from hub.config import GatewaySection
from hub.errors import HubError
from hub.gateway.auth import ApiKeys
from hub.gateway.errors import ApiError
from hub.gateway.metrics import GatewayMetrics

log = logging.getLogger("hub.gateway")

DEFAULT_ALIAS = "whisper-1"  # what OpenAI's clients ask for; it means the hub's default provider
WATCH_INTERVAL = 1.0


@dataclass(frozen=True)
class Settings:
    """The gateway's settings: its config section, where the hub is, and the hub's audio bound."""

    hub: str
    section: GatewaySection
    max_audio_seconds: float = 1800.0

    @property
    def max_upload_bytes(self) -> int:
        return int(self.section.max_upload_mb * 1024 * 1024)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        section = settings.section
        curve = CurveKeys.load(section.client_secret_key, section.server_public_key) if section.client_secret_key else None
        self.client = AsyncHubClient(settings.hub, timeout=section.request_timeout, curve=curve)
        self.keys = ApiKeys(settings.section.api_keys_file)
        self.metrics = GatewayMetrics()
        self.in_flight = 0
        self.hub_ready = False
        self.hub_status: dict[str, Any] | None = None
        self.hub_problem = "the hub has not answered yet"
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
        """Poll the hub's status: /readyz and /v1/models answer from what was seen last."""
        while True:
            try:
                status = await self.client.status(timeout=2.0)
            except HubError as exc:
                self._set_ready(False, f"the hub at {self.settings.hub} does not answer: {exc.message}")
            else:
                self.hub_status = status
                hub = status["hub"]
                if hub.get("shutting_down"):
                    self._set_ready(False, "the hub is draining (shutting down)")
                elif not hub.get("ready"):
                    self._set_ready(False, "the hub's pools are not ready yet")
                else:
                    self._set_ready(True, "")
            await asyncio.sleep(WATCH_INTERVAL)

    def _set_ready(self, ready: bool, problem: str) -> None:
        if ready != self.hub_ready:
            log.info("hub %s", "ready" if ready else f"not ready: {problem}")
        self.hub_ready, self.hub_problem = ready, problem
        self.metrics.hub_up.set(1 if ready else 0)

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
        """One entry per enabled provider, as the hub last reported them."""
        providers = (self.hub_status or {}).get("providers", {})
        return [{"id": name, **info} for name, info in providers.items() if info.get("enabled", True)]

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
