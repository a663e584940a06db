"""What the gateway makes of its hubs' statuses: one view for /readyz, /v1/models and Wyoming's ``info``.

The gateway fronts one hub or many (``--hub`` repeated, or ``dns+tcp://NAME:PORT``). Either way it sees
``{endpoint: status}``, where a hub that did not answer has ``{"error": {code, message}}`` (the shape of
``AsyncHubPool.status()["hubs"]``). With many hubs the gateway serves while any of them can:

- it is **ready** while at least one hub answers, is ready and is not draining, because the pool sends
  every request to such a hub (and retries a refused one on another);
- its **models** are the union of the enabled providers of every hub that answers (ready, loading or
  draining: a hub's config says what it serves), the first hub's order first. Hubs behind one gateway
  are meant to share one config, so a model's details come from the first hub that lists it; it counts
  as degraded only if it is degraded on every hub that lists it.

Pure functions, no I/O: the gateway's watch feeds them what it polled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hub.status import HubStatus, ReadyState

HubStatuses = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Readiness:
    """Whether the gateway can serve, why not, and how many of its hubs are ready."""

    ready: bool
    problem: str  # empty when ready
    hubs_ready: int


def answered(status: dict[str, Any]) -> bool:
    return HubStatus.of(status) is not None


def hub_problem(endpoint: str, status: dict[str, Any]) -> str | None:
    """Why this hub cannot take a request now, or None if it can."""
    typed = HubStatus.of(status)
    if typed is None:
        error = status.get("error", {})
        return f"the hub at {endpoint} does not answer ({error.get('code', 'no status')}): {error.get('message', '')}"
    return {
        ReadyState.READY: None,
        ReadyState.DRAINING: f"the hub at {endpoint} is draining (shutting down)",
        ReadyState.NOT_READY: f"the hub at {endpoint} has not got its pools ready yet",
    }[typed.readiness]


def readiness(hubs: HubStatuses, where: str) -> Readiness:
    """Ready while at least one hub is; otherwise every hub's reason (``where`` names the hubs asked for,
    for when none was found at all, as when a DNS name resolves to no address)."""
    problems = {endpoint: hub_problem(endpoint, status) for endpoint, status in hubs.items()}
    ready = sum(1 for problem in problems.values() if problem is None)
    if ready:
        return Readiness(True, "", ready)
    if not hubs:
        return Readiness(False, f"no hub found at {where}", 0)
    reasons = "; ".join(p for p in problems.values() if p is not None)
    return Readiness(False, reasons if len(hubs) == 1 else f"none of the {len(hubs)} hubs is ready: {reasons}", 0)


def providers(hubs: HubStatuses) -> list[dict[str, Any]]:
    """The enabled providers of every hub that answered, once each, with ``id`` set to the provider's name."""
    merged: dict[str, dict[str, Any]] = {}
    for status in hubs.values():
        if not answered(status):
            continue
        for name, info in status["providers"].items():
            if not info.get("enabled", True):
                continue
            if name not in merged:
                merged[name] = {"id": name, **info}
            else:
                merged[name]["degraded"] = bool(merged[name].get("degraded")) and bool(info.get("degraded"))
    return list(merged.values())
