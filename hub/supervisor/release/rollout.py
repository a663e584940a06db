"""Gray release at run time: each route's current weights, its shadow, its analysis windows, its rollbacks.

Mechanism around the pure decisions of ``hub.supervisor.release.routes``: the supervisor asks ``resolve`` which
provider a request for a route goes to and ``shadow_for`` whether it is also shadowed; the farm
reports every routed job's end to ``ended`` (once, on every path). A shadow's answer is compared
with its primary's (WER and time ratio) when both have ended, and the hub-owned name of the PCM
the shadow read is removed then, whatever became of either job.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from hub import shm
from hub.config import RouteConfig, baseline_of
from hub.errors import BadRequest, UnknownProvider
from hub.status import RouteStatus, ShadowStatus, WindowStatus
from hub.supervisor.jobs import Job, JobKind
from hub.supervisor.metrics import Metrics
from hub.supervisor.release import routes
from hub.wer import word_error_rate

log = logging.getLogger("hub.supervisor")


@dataclass
class _Answer:
    ok: bool
    run: float
    text: str


@dataclass
class _Pending:
    """A primary and its shadow, until both have ended."""

    route: str
    shadow: str
    primary: _Answer | None = None
    shadowed: _Answer | None = None


@dataclass
class RouteState:
    """One route as it runs: weights that may differ from the config's, and what the analysis has seen."""

    config: RouteConfig
    weights: dict[str, float]
    shadow_on: bool = True
    rolled_back: dict[str, str] = field(default_factory=dict)  # provider -> why
    windows: dict[str, deque[tuple[bool, float]]] = field(default_factory=dict)  # provider -> (failed, run)
    agreement: deque[float] = field(default_factory=deque)  # the shadow's last WERs against the primary

    @staticmethod
    def of(config: RouteConfig, weights: dict[str, float] | None = None) -> RouteState:
        size = config.analysis.min_requests if config.analysis else 0
        return RouteState(config, dict(config.weights if weights is None else weights), agreement=deque(maxlen=size))

    def window(self, provider: str) -> deque[tuple[bool, float]]:
        return self.windows.setdefault(provider, deque(maxlen=self.agreement.maxlen))

    def figures(self, provider: str) -> routes.WindowFigures:
        window = self.window(provider)
        return routes.WindowFigures(
            requests=len(window),
            errors=sum(1 for failed, _ in window if failed),
            p95=routes.p95([run for failed, run in window if not failed]),
        )


class Rollout:
    def __init__(self, configs: dict[str, RouteConfig], metrics: Metrics, rng: random.Random | None = None) -> None:
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.routes: dict[str, RouteState] = {}
        self.pending: dict[str, _Pending] = {}
        self.reconfigure(configs)

    def reconfigure(self, configs: dict[str, RouteConfig]) -> None:
        """A (re)loaded config: routes whose section changed start over from it (weights, rollbacks, windows);
        unchanged routes keep what was set at run time or rolled back, so an unrelated SIGHUP undoes nothing."""
        self.routes = {
            name: state
            if (state := self.routes.get(name)) is not None and state.config == config
            else RouteState.of(config)
            for name, config in configs.items()
        }
        for name, state in self.routes.items():
            self.metrics.route_weights(name, state.weights)

    def resolve(self, name: str, key: str | None, unavailable: Mapping[str, routes.Unavailable]) -> str | None:
        """The provider a request for ``name`` goes to, or None when ``name`` is not a route. A provider that
        cannot serve now gets nothing while another of the route can; with an ``analysis:`` block, a canary that
        is down (disabled, or degraded: it cannot start) is rolled back for good, as a failing one is."""
        state = self.routes.get(name)
        if state is None:
            return None
        if state.config.analysis is not None:
            baseline = baseline_of(state.weights, tuple(state.weights))
            for provider, why in unavailable.items():
                if why.failed and provider != baseline and state.weights.get(provider, 0.0) > 0:
                    self._roll_back(name, state, provider, f"it cannot serve: {why.reason}; baseline {baseline}")
        weights = routes.routable(state.weights, unavailable)
        return routes.pick(weights, key, state.config.sticky, self.rng)

    def shadow_for(self, name: str, unavailable: Mapping[str, routes.Unavailable]) -> str | None:
        """The shadow provider when this request for the route is to be shadowed (its ``fraction``). A shadow
        that cannot serve gets no copy (counted as dropped); with an ``analysis:`` block, one that is down is
        turned off and rolled back."""
        state = self.routes.get(name)
        shadow = state.config.shadow if state is not None else None
        if state is None or shadow is None or not state.shadow_on:
            return None
        why = unavailable.get(shadow.provider)
        if why is not None and why.failed and state.config.analysis is not None:
            state.shadow_on = False
            self._roll_back(name, state, shadow.provider, f"as a shadow, it cannot serve: {why.reason}")
            return None
        if self.rng.random() >= shadow.fraction:
            return None
        if why is not None:
            self.dropped(name, shadow.provider)
            return None
        return shadow.provider

    def dropped(self, name: str, provider: str) -> None:
        self.metrics.route_shadow(name, provider, "dropped")

    def paired(self, primary: Job, shadow: Job) -> None:
        primary.pair = shadow.pair = primary.id
        self.pending[primary.id] = _Pending(primary.route, shadow.provider)

    def set_weights(self, name: str, weights: dict[str, float], known: set[str]) -> dict[str, float]:
        """An operator's new weights: providers of the route left out get 0; clears a rollback."""
        state = self.routes.get(name)
        if state is None:
            raise UnknownProvider(f"no route named {name!r}; this hub's routes: {', '.join(self.routes) or 'none'}")
        unknown = sorted(set(weights) - known)
        if unknown:
            raise UnknownProvider(f"route {name!r}: no enabled provider named {', '.join(map(repr, unknown))}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise BadRequest(f"route {name!r}: weights must be >= 0 and add up to more than 0")
        new = {p: 0.0 for p in state.weights} | {p: float(w) for p, w in weights.items()}
        self.routes[name] = RouteState.of(state.config, new)
        self.metrics.route_weights(name, new)
        log.info("route %s: weights set to %s", name, _describe(new))
        return new

    def ended(self, job: Job, code: str | None, run: float, text: str) -> None:
        """A routed job (or a shadow) ended: success (``code`` None) or the error's code."""
        state = self.routes.get(job.route)
        if job.kind is JobKind.SHADOW:
            if job.audio.shm:
                shm.remove(job.audio.shm)
            if code is not None:
                self.metrics.route_shadow(job.route, job.provider, "failed")
        else:
            self.metrics.route_finished(job.route, job.provider, code is not None)
            if state is not None and state.config.analysis is not None:
                state.window(job.provider).append((code is not None, run))
                self._analyse(job.route, state)
        pending = self.pending.get(job.pair) if job.pair else None
        if pending is None:
            return
        answer = _Answer(code is None, run, text)
        if job.kind is JobKind.SHADOW:
            pending.shadowed = answer
        else:
            pending.primary = answer
        if pending.primary is not None and pending.shadowed is not None:
            del self.pending[job.pair]
            self._compare(pending, state)

    def _compare(self, pending: _Pending, state: RouteState | None) -> None:
        primary, shadow = pending.primary, pending.shadowed
        assert primary is not None and shadow is not None
        if not (primary.ok and shadow.ok):
            return  # a failed shadow is counted when it ends; a failed primary leaves nothing to compare with
        wer = word_error_rate(primary.text, shadow.text)
        ratio = shadow.run / primary.run if primary.run > 0 else None
        self.metrics.route_compared(pending.route, pending.shadow, wer, ratio)
        if state is None or state.config.analysis is None or not state.shadow_on:
            return
        state.agreement.append(wer)
        agreement = routes.Agreement(len(state.agreement), sum(state.agreement) / len(state.agreement))
        decision = routes.judge_agreement(agreement, state.config.analysis)
        if decision.verdict is routes.Verdict.ROLL_BACK:
            state.shadow_on = False
            self._roll_back(pending.route, state, pending.shadow, f"as a shadow: {decision.reason}")

    def _analyse(self, name: str, state: RouteState) -> None:
        assert state.config.analysis is not None
        order = tuple(state.weights)
        baseline = baseline_of(state.weights, order)
        base = state.figures(baseline)
        for canary in [p for p in order if p != baseline and state.weights[p] > 0]:
            decision = routes.judge(base, state.figures(canary), state.config.analysis)
            if decision.verdict is routes.Verdict.ROLL_BACK:
                self._roll_back(name, state, canary, f"{decision.reason}; baseline {baseline}")

    def _roll_back(self, name: str, state: RouteState, provider: str, reason: str) -> None:
        if provider in state.weights and provider != baseline_of(state.weights, tuple(state.weights)):
            state.weights[provider] = 0.0
        state.rolled_back[provider] = reason
        state.windows.pop(provider, None)
        self.metrics.route_rolled_back(name, provider)
        self.metrics.route_weights(name, state.weights)
        log.error("route %s: rolled back %s (weights now %s): %s", name, provider, _describe(state.weights), reason)

    def status(self) -> dict[str, RouteStatus]:
        """The ``routes`` part of the hub's status."""
        return {
            name: RouteStatus(
                weights=dict(state.weights),
                configured_weights=state.config.weights,
                sticky=state.config.sticky,
                shadow=(
                    ShadowStatus(
                        provider=state.config.shadow.provider, fraction=state.config.shadow.fraction, on=state.shadow_on
                    )
                    if state.config.shadow
                    else None
                ),
                analysis=None
                if state.config.analysis is None
                else {p: _window(state.figures(p)) for p in state.weights},
                rolled_back=dict(state.rolled_back),
                figures=self.metrics.route_summary(name),
            )
            for name, state in self.routes.items()
        }


def _window(f: routes.WindowFigures) -> WindowStatus:
    return WindowStatus(
        requests=f.requests, error_rate=round(f.error_rate, 4), p95_ms=None if f.p95 is None else round(f.p95 * 1e3, 3)
    )


def _describe(weights: dict[str, float]) -> str:
    return ", ".join(f"{p}={w:g}" for p, w in weights.items())
