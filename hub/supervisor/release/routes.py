"""Gray-release decisions as pure functions: which provider a routed request goes to, and whether a
canary is rolled back. No clock, no process, no socket: the supervisor feeds figures in and carries
the answer out (``hub.supervisor.release.rollout``), as it does with the scaling policy.

Sticky routing is weighted rendezvous hashing: every (key, provider) pair gets a score from a hash
and the provider's weight, and the key goes to the highest score. While the weights stay the same a
key keeps its provider; when one provider's weight grows, only keys that move *to* it move, and a
provider set to 0 loses exactly its keys (consistent hashing, no table to keep).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from hub.config import AnalysisConfig


def _unit(key: str, provider: str) -> float:
    """A uniform number in (0, 1) for the pair, the same in every process and run."""
    digest = hashlib.blake2b(f"{provider}\0{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def sticky_pick(weights: dict[str, float], key: str) -> str:
    """The provider ``key`` belongs to under ``weights`` (at least one weight > 0)."""
    return max((-w / math.log(_unit(key, p)), p) for p, w in weights.items() if w > 0)[1]


def weighted_pick(weights: dict[str, float], rng: random.Random) -> str:
    """A provider drawn in proportion to its weight (at least one weight > 0)."""
    names = [p for p, w in weights.items() if w > 0]
    return rng.choices(names, [weights[p] for p in names])[0]


@dataclass(frozen=True)
class Unavailable:
    """Why a provider cannot take a routed request now. ``failed``: it is down (disabled, degraded: its workers
    fail to start), which with an ``analysis:`` block is a canary failure; else it only has no ready worker yet."""

    reason: str
    failed: bool


def routable(weights: dict[str, float], unavailable: Mapping[str, Unavailable]) -> dict[str, float]:
    """The weights a pick uses: a provider that cannot serve gets none while another of the route can (the others'
    weights are renormalised by the draw itself); when none can, the route's weights stay, and the request meets
    the provider's own error."""
    able = {p: (0.0 if p in unavailable else w) for p, w in weights.items()}
    return able if any(w > 0 for w in able.values()) else weights


def pick(weights: dict[str, float], key: str | None, sticky: bool, rng: random.Random) -> str:
    """Where a request for a route goes: by its ``route_key`` on a sticky route, else drawn by weight."""
    return sticky_pick(weights, key) if sticky and key else weighted_pick(weights, rng)


@dataclass(frozen=True)
class WindowFigures:
    """One provider's last requests through a route: how many, how many failed, the p95 time on a worker."""

    requests: int
    errors: int
    p95: float | None  # seconds; None without a successful request

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Agreement:
    """A shadow's comparisons with the primary's answers: how many and their mean word error rate."""

    compared: int
    mean_wer: float


class Verdict(str, Enum):
    KEEP = "keep"
    WAIT = "wait"  # not enough requests yet to judge
    ROLL_BACK = "roll_back"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""


def judge(baseline: WindowFigures, canary: WindowFigures, limits: AnalysisConfig) -> Decision:
    """A canary against its baseline, each over (at least) ``min_requests`` of its last requests."""
    if min(baseline.requests, canary.requests) < limits.min_requests:
        return Decision(Verdict.WAIT)
    increase = canary.error_rate - baseline.error_rate
    if increase > limits.max_error_rate_increase:
        return Decision(
            Verdict.ROLL_BACK,
            f"error rate {canary.error_rate:.1%} over its last {canary.requests} requests, "
            f"{increase:.1%} above the baseline's {baseline.error_rate:.1%} (max_error_rate_increase "
            f"{limits.max_error_rate_increase:g})",
        )
    if canary.p95 is not None and baseline.p95 and canary.p95 / baseline.p95 > limits.max_latency_ratio:
        return Decision(
            Verdict.ROLL_BACK,
            f"p95 time on a worker {canary.p95 * 1e3:.0f} ms, {canary.p95 / baseline.p95:.2f}x the baseline's "
            f"{baseline.p95 * 1e3:.0f} ms (max_latency_ratio {limits.max_latency_ratio:g})",
        )
    return Decision(Verdict.KEEP)


def judge_agreement(agreement: Agreement, limits: AnalysisConfig) -> Decision:
    """A shadow whose answers stray too far from the primary's, over at least ``min_requests`` comparisons."""
    if agreement.compared < limits.min_requests:
        return Decision(Verdict.WAIT)
    if agreement.mean_wer > limits.max_wer:
        return Decision(
            Verdict.ROLL_BACK,
            f"mean WER against the primary {agreement.mean_wer:.3f} over {agreement.compared} comparisons "
            f"(max_wer {limits.max_wer:g})",
        )
    return Decision(Verdict.KEEP)


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank) of a window's values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
