"""Gray release without processes: route config validation, sticky and weighted picks, the analysis
decision, word error rate, and the run-time state (weights, rollbacks, shadow comparisons)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from hub.config import AnalysisConfig, ConfigError, baseline_of, parse_config
from hub.protocol import AudioRef
from hub.supervisor.jobs import Job, JobKind
from hub.supervisor.metrics import Metrics
from hub.supervisor.release import routes
from hub.supervisor.release.rollout import Rollout
from hub.supervisor.release.routes import Verdict, WindowFigures
from hub.wer import word_error_rate

pytestmark = pytest.mark.timeout(60)

PROVIDERS = {
    "v1": {"type": "echo"},
    "v2": {"type": "echo"},
    "v3": {"type": "echo"},
    "off": {"type": "echo", "enabled": False},
}


def config(routes_section: dict) -> dict:
    return parse_config({"providers": PROVIDERS, "routes": routes_section}).routes


def test_a_route_in_full_and_a_bare_list() -> None:
    parsed = config(
        {
            "whisper": {
                "providers": [{"provider": "v1", "weight": 95}, {"provider": "v2", "weight": 5}],
                "shadow": {"provider": "v3", "fraction": 0.2},
                "sticky": True,
                "analysis": {
                    "min_requests": 200,
                    "max_error_rate_increase": 0.01,
                    "max_latency_ratio": 1.5,
                    "max_wer": 0.15,
                },
            },
            "small": [{"provider": "v1", "weight": 1}],
        }
    )
    assert parsed["whisper"].weights == {"v1": 95.0, "v2": 5.0}
    assert parsed["whisper"].shadow is not None and parsed["whisper"].shadow.fraction == 0.2
    assert parsed["whisper"].sticky and parsed["whisper"].analysis == AnalysisConfig(200, 0.01, 1.5, 0.15)
    assert parsed["small"].weights == {"v1": 1.0} and not parsed["small"].sticky and parsed["small"].analysis is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"r": [{"provider": "nope", "weight": 1}]}, "routes.r.providers[0].provider: no provider named 'nope'"),
        ({"r": [{"provider": "off", "weight": 1}]}, "routes.r.providers[0].provider: provider 'off' is disabled"),
        ({"r": [{"provider": "v1", "weight": -1}]}, "routes.r.providers[0].weight: must be >= 0"),
        (
            {"r": [{"provider": "v1", "weight": 0}, {"provider": "v2", "weight": 0}]},
            "routes.r.providers: the weights must add up to more than 0",
        ),
        ({"r": [{"provider": "v1", "weight": "lots"}]}, "routes.r.providers[0].weight: expected a number"),
        (
            {"r": [{"provider": "v1", "weight": 1}, {"provider": "v1", "weight": 2}]},
            "routes.r.providers: a provider is listed twice",
        ),
        ({"r": []}, "routes.r.providers: give at least one provider"),
        ({"r": {"sticky": True}}, "routes.r.providers: required"),
        ({"r": {"providers": [{"provider": "v1"}], "colour": 1}}, "routes.r.colour: unknown key"),
        ({"v2": [{"provider": "v1", "weight": 1}]}, "routes.v2: 'v2' is also a provider's name"),
        (
            {"r": {"providers": [{"provider": "v1"}], "shadow": {"provider": "zz"}}},
            "routes.r.shadow.provider: no provider named 'zz'",
        ),
        (
            {"r": {"providers": [{"provider": "v1"}], "shadow": {"provider": "v2", "fraction": 1.5}}},
            "routes.r.shadow.fraction: must be in (0, 1]",
        ),
        (
            {"r": {"providers": [{"provider": "v1"}], "analysis": {"min_requests": 0}}},
            "routes.r.analysis.min_requests: must be at least 1",
        ),
        (
            {"r": {"providers": [{"provider": "v1"}], "analysis": {"max_wer": -0.1}}},
            "routes.r.analysis.max_wer: must be >= 0",
        ),
        ({"R!": [{"provider": "v1"}]}, "routes.R!: route names are"),
    ],
)
def test_invalid_routes_name_the_key_path(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config(section)
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_route_may_take_the_name_of_a_provider_it_routes_to() -> None:
    parsed = config({"v1": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}]})
    assert parsed["v1"].weights == {"v1": 90.0, "v2": 10.0}


def test_gateway_aliases_may_name_a_route() -> None:
    parsed = parse_config(
        {
            "providers": PROVIDERS,
            "routes": {"r": [{"provider": "v1"}]},
            "gateway": {"model_aliases": {"whisper-1": "r"}},
        }
    )
    assert parsed.gateway.model_aliases == {"whisper-1": "r"}


def test_sticky_keys_keep_their_provider_and_move_only_where_they_must() -> None:
    keys = [f"user-{i}" for i in range(5000)]
    before = {k: routes.sticky_pick({"v1": 90, "v2": 10}, k) for k in keys}
    assert before == {k: routes.sticky_pick({"v1": 90, "v2": 10}, k) for k in keys}  # stable
    share = Counter(before.values())["v2"] / len(keys)
    assert abs(share - 0.10) < 4 * math.sqrt(0.1 * 0.9 / len(keys))
    after = {k: routes.sticky_pick({"v1": 80, "v2": 20}, k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "v1" and after[k] == "v2" for k in moved)  # v2 grew: keys only move to it
    assert abs(len(moved) / len(keys) - 0.10) < 4 * math.sqrt(0.1 * 0.9 / len(keys))  # 10 % had to move
    # a third provider joining takes keys from both, never swaps keys between the old two
    third = {k: routes.sticky_pick({"v1": 80, "v2": 20, "v3": 25}, k) for k in keys}
    assert all(third[k] in (after[k], "v3") for k in keys)
    # a provider set to 0 loses exactly its keys
    dropped = {k: routes.sticky_pick({"v1": 80, "v2": 0}, k) for k in keys}
    assert set(dropped.values()) == {"v1"}


def test_weighted_pick_follows_the_weights_and_never_picks_weight_zero() -> None:
    rng = random.Random(7)
    picks = Counter(routes.pick({"v1": 3, "v2": 1, "v3": 0}, None, sticky=True, rng=rng) for _ in range(8000))
    assert picks["v3"] == 0
    assert abs(picks["v2"] / 8000 - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 8000)


def test_baseline_is_the_heaviest_and_the_first_listed_on_a_tie() -> None:
    assert baseline_of({"v1": 10, "v2": 90}, ("v1", "v2")) == "v2"
    assert baseline_of({"v1": 50, "v2": 50}, ("v1", "v2")) == "v1"


LIMITS = AnalysisConfig(min_requests=100, max_error_rate_increase=0.01, max_latency_ratio=1.5, max_wer=0.15)


@pytest.mark.parametrize(
    ("baseline", "canary", "verdict", "why"),
    [
        (WindowFigures(100, 0, 0.5), WindowFigures(99, 50, 0.5), Verdict.WAIT, ""),
        (WindowFigures(99, 0, 0.5), WindowFigures(100, 50, 0.5), Verdict.WAIT, ""),
        (WindowFigures(100, 1, 0.5), WindowFigures(100, 2, 0.5), Verdict.KEEP, ""),  # +1 %: not more than 0.01
        (WindowFigures(100, 1, 0.5), WindowFigures(100, 3, 0.5), Verdict.ROLL_BACK, "error rate 3.0%"),
        (WindowFigures(100, 0, 0.5), WindowFigures(100, 0, 0.75), Verdict.KEEP, ""),
        (WindowFigures(100, 0, 0.5), WindowFigures(100, 0, 0.76), Verdict.ROLL_BACK, "p95 time on a worker 760 ms"),
        (WindowFigures(100, 100, None), WindowFigures(100, 100, None), Verdict.KEEP, ""),
    ],
)
def test_the_analysis_decision(baseline: WindowFigures, canary: WindowFigures, verdict: Verdict, why: str) -> None:
    decision = routes.judge(baseline, canary, LIMITS)
    assert decision.verdict is verdict
    assert why in decision.reason and (verdict is Verdict.ROLL_BACK) == bool(decision.reason)


def test_the_agreement_decision() -> None:
    assert routes.judge_agreement(routes.Agreement(99, 0.9), LIMITS).verdict is Verdict.WAIT
    assert routes.judge_agreement(routes.Agreement(100, 0.15), LIMITS).verdict is Verdict.KEEP
    assert routes.judge_agreement(routes.Agreement(100, 0.16), LIMITS).verdict is Verdict.ROLL_BACK


def test_p95_is_the_nearest_rank() -> None:
    assert routes.p95([]) is None
    assert routes.p95([float(i) for i in range(1, 101)]) == 95.0
    assert routes.p95([3.0]) == 3.0


def test_word_error_rate() -> None:
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "a dog") == 1.0
    assert word_error_rate("", "") == 0.0
    assert word_error_rate("don't stop", "do not stop") == 1.0


def _job(job_id: str, provider: str, route: str = "r", shadow: bool = False) -> Job:
    kind = JobKind.SHADOW if shadow else JobKind.REQUEST
    return Job(
        id=job_id,
        kind=kind,
        client=b"" if shadow else b"c",
        request_id=job_id,
        provider=provider,
        audio=AudioRef(1),
        payload=None,
        options={},
        stream=False,
        received_at=0.0,
        acquire_deadline=0.0,
        client_timeout=None,
        route=route,
    )


def _rollout(analysis: dict | None = None, shadow: dict | None = None) -> tuple[Rollout, Metrics]:
    body: dict = {"providers": [{"provider": "v1", "weight": 50}, {"provider": "v2", "weight": 50}]}
    if analysis:
        body["analysis"] = analysis
    if shadow:
        body["shadow"] = shadow
    metrics = Metrics()
    return Rollout(config({"r": body}), metrics, random.Random(1)), metrics


def test_a_failing_canary_is_rolled_back_and_stays_so_until_weights_are_set() -> None:
    rollout, metrics = _rollout({"min_requests": 30, "max_error_rate_increase": 0.05})
    for i in range(30):
        rollout.ended(_job(f"a{i}", "v1"), None, 0.01, "x")
        rollout.ended(_job(f"b{i}", "v2"), "INFERENCE_FAILED" if i % 3 == 2 else None, 0.01, "x")
    state = rollout.status()["r"]
    assert state.weights == {"v1": 50.0, "v2": 0.0}
    assert "error rate 33.3%" in state.rolled_back["v2"]
    assert state.figures.rollbacks == {"v2": 1}
    assert {rollout.resolve("r", None, {}) for _ in range(50)} == {"v1"}
    rollout.set_weights("r", {"v1": 50, "v2": 50}, {"v1", "v2"})
    assert rollout.status()["r"].rolled_back == {} and rollout.status()["r"].weights == {"v1": 50.0, "v2": 50.0}


def test_a_healthy_canary_is_kept() -> None:
    rollout, _ = _rollout({"min_requests": 30})
    for i in range(100):
        rollout.ended(_job(f"a{i}", "v1"), None, 0.01, "x")
        rollout.ended(_job(f"b{i}", "v2"), None, 0.012, "x")
    assert rollout.status()["r"].rolled_back == {}


def test_set_weights_checks_names_and_sums_and_zeroes_providers_left_out() -> None:
    rollout, _ = _rollout()
    assert rollout.set_weights("r", {"v1": 100}, {"v1", "v2"}) == {"v1": 100.0, "v2": 0.0}
    with pytest.raises(Exception, match="no route named 'zz'"):
        rollout.set_weights("zz", {"v1": 1}, {"v1"})
    with pytest.raises(Exception, match="no enabled provider named 'v9'"):
        rollout.set_weights("r", {"v9": 1}, {"v1", "v2"})
    with pytest.raises(Exception, match="add up to more than 0"):
        rollout.set_weights("r", {"v1": 0}, {"v1", "v2"})


def test_a_reload_resets_only_the_routes_whose_config_changed() -> None:
    rollout, _ = _rollout()
    rollout.set_weights("r", {"v1": 100}, {"v1", "v2"})
    rollout.reconfigure(
        config({"r": {"providers": [{"provider": "v1", "weight": 50}, {"provider": "v2", "weight": 50}]}})
    )
    assert rollout.status()["r"].weights == {"v1": 100.0, "v2": 0.0}
    rollout.reconfigure(config({"r": [{"provider": "v1", "weight": 80}, {"provider": "v2", "weight": 20}]}))
    assert rollout.status()["r"].weights == {"v1": 80.0, "v2": 20.0}


def test_a_shadow_is_compared_when_both_have_ended_in_either_order() -> None:
    rollout, metrics = _rollout(shadow={"provider": "v3", "fraction": 1.0})
    for first_primary in (True, False):
        primary, shadow = _job(f"p{first_primary}", "v1"), _job(f"s{first_primary}", "v3", shadow=True)
        rollout.paired(primary, shadow)
        ends = [(primary, "the cat sat", 0.1), (shadow, "the cat sat down", 0.2)]
        for job, text, run in ends if first_primary else ends[::-1]:
            rollout.ended(job, None, run, text)
    assert rollout.pending == {}
    wer = rollout.status()["r"].figures.agreement_wer["v3"]
    assert wer.count == 2 and wer.mean == pytest.approx(1 / 3, abs=1e-3)
    assert rollout.status()["r"].figures.latency_ratio["v3"].count == 2


def test_a_failed_shadow_is_counted_not_compared() -> None:
    rollout, _ = _rollout(shadow={"provider": "v3"})
    primary, shadow = _job("p", "v1"), _job("s", "v3", shadow=True)
    rollout.paired(primary, shadow)
    rollout.ended(shadow, "JOB_TIMEOUT", 1.0, "")
    rollout.ended(primary, None, 0.1, "text")
    status = rollout.status()["r"]
    assert (
        status.figures.shadow_requests == {"v3 failed": 1}
        and status.figures.agreement_wer == {}
        and rollout.pending == {}
    )


def test_a_disagreeing_shadow_is_switched_off_by_the_analysis() -> None:
    rollout, _ = _rollout({"min_requests": 5, "max_wer": 0.15}, {"provider": "v3"})
    for i in range(5):
        primary, shadow = _job(f"p{i}", "v1"), _job(f"s{i}", "v3", shadow=True)
        rollout.paired(primary, shadow)
        rollout.ended(primary, None, 0.1, "hello world")
        rollout.ended(shadow, None, 0.1, "echo 1.000s rms=0.1")
    status = rollout.status()["r"]
    assert status.shadow is not None and status.shadow.on is False and "mean WER" in status.rolled_back["v3"]
    assert all(rollout.shadow_for("r", {}) is None for _ in range(20))


def test_routable_weights_leave_out_who_cannot_serve_while_another_can() -> None:
    down = {"v2": routes.Unavailable("it is degraded", failed=True)}
    assert routes.routable({"v1": 90, "v2": 10}, down) == {"v1": 90, "v2": 0.0}
    assert routes.routable({"v1": 0, "v2": 10}, down) == {"v1": 0, "v2": 10}  # nobody else can: unchanged
    assert routes.routable({"v1": 90, "v2": 10}, {}) == {"v1": 90, "v2": 10}
    rng = random.Random(3)
    assert {routes.pick(routes.routable({"v1": 1, "v2": 99}, down), None, False, rng) for _ in range(50)} == {"v1"}
    keys = [f"k{i}" for i in range(200)]
    before = {k: routes.pick({"v1": 50, "v2": 50}, k, True, rng) for k in keys}
    after = {k: routes.pick(routes.routable({"v1": 50, "v2": 50}, down), k, True, rng) for k in keys}
    assert all(after[k] == "v1" for k in keys) and all(before[k] == after[k] for k in keys if before[k] == "v1")


def test_a_canary_that_cannot_serve_is_routed_around_and_with_analysis_rolled_back() -> None:
    down = {"v2": routes.Unavailable("it is degraded (boom)", failed=True)}
    plain, _ = rollout_of({"providers": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}]})
    assert {plain.resolve("r", None, down) for _ in range(100)} == {"v1"}
    assert plain.status()["r"].rolled_back == {} and plain.status()["r"].weights == {"v1": 90.0, "v2": 10.0}
    analysed, metrics = rollout_of(
        {
            "providers": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}],
            "analysis": {"min_requests": 5},
        }
    )
    assert analysed.resolve("r", None, down) == "v1"
    state = analysed.status()["r"]
    assert state.weights == {"v1": 90.0, "v2": 0.0} and "cannot serve: it is degraded (boom)" in state.rolled_back["v2"]
    starting = {"v2": routes.Unavailable("it has no ready worker", failed=False)}
    patient, _ = rollout_of(
        {
            "providers": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}],
            "analysis": {"min_requests": 5},
        }
    )
    assert {patient.resolve("r", None, starting) for _ in range(50)} == {"v1"}
    assert patient.status()["r"].rolled_back == {}  # not started yet is no failure


def test_a_shadow_that_cannot_serve_gets_no_copy_and_with_analysis_is_turned_off() -> None:
    body = {"providers": [{"provider": "v1", "weight": 100}], "shadow": {"provider": "v2", "fraction": 1.0}}
    down = {"v2": routes.Unavailable("it is degraded", failed=True)}
    plain, _ = rollout_of(body)
    assert plain.shadow_for("r", {}) == "v2" and plain.shadow_for("r", down) is None
    analysed, _ = rollout_of({**body, "analysis": {"min_requests": 5}})
    assert analysed.shadow_for("r", down) is None
    assert analysed.status()["r"].shadow.on is False and "as a shadow" in analysed.status()["r"].rolled_back["v2"]
    assert analysed.shadow_for("r", {}) is None  # off for good, until the route's section changes


def rollout_of(body: dict) -> tuple[Rollout, Metrics]:
    metrics = Metrics()
    return Rollout(config({"r": body}), metrics, random.Random(1)), metrics
