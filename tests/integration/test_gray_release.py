"""Gray release on real supervisors: weighted and sticky routes, run-time weights (SDK, CLI, SIGHUP,
scripts/rollback.sh), shadow traffic that never delays or fails the primary, the automatic rollback of
a failing canary, and two whisper versions compared on real speech."""

from __future__ import annotations

import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import yaml

from hub import shm
from hub.config import hub_id
from hub.errors import HubError
from hub.supervisor.release import routes
from tests.conftest import DATA, ROOT, Hub, reference, wait_for

pytestmark = pytest.mark.timeout(180)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
Z999 = 3.29  # two-sided 99.9 % of a normal


def echo(**options: Any) -> dict[str, Any]:
    return {"type": "echo", "options": options} if options else {"type": "echo"}


def within_binomial(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= Z999 * math.sqrt(n * p * (1 - p))


def providers_of(hub: Hub, route: str, n: int, **kwargs: Any) -> Counter[str]:
    with hub.client() as client:
        return Counter(client.transcribe(TONE[:1600], route, **kwargs).provider for _ in range(n))


def cli(hub: Hub, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub.client", "--endpoint", hub.endpoint, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def hub_segments(hub: Hub) -> list[str]:
    return shm.list_segments(shm.hub_prefix(hub_id(hub.endpoint)))


def test_a_90_10_split_and_weights_changed_at_run_time(hub_factory) -> None:
    hub = hub_factory(
        {"v1": echo(), "v2": echo()},
        routes={"asr": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}]},
    )
    counts = providers_of(hub, "asr", 2000)
    assert set(counts) == {"v1", "v2"} and within_binomial(counts["v2"], 2000, 0.10), counts
    out = cli(hub, "route", "asr", "v2=100")
    assert out.returncode == 0 and "route asr: v1=0, v2=100" in out.stdout, out.stdout + out.stderr
    assert providers_of(hub, "asr", 20) == Counter({"v2": 20})  # from the very next request
    with hub.client() as client:
        assert client.route("asr", {"v1": 100})["weights"] == {"v1": 100.0, "v2": 0.0}  # the instant rollback
        assert client.transcribe(TONE, "v2").provider == "v2"  # a provider's own name still reaches it
        with pytest.raises(HubError) as raised:
            client.route("asr", {"v9": 1})
        assert raised.value.code == "UNKNOWN_PROVIDER" and "v9" in raised.value.message
    assert providers_of(hub, "asr", 20) == Counter({"v1": 20})
    bad = cli(hub, "route", "asr", "v1")
    assert bad.returncode == 2 and "PROVIDER=WEIGHT" in bad.stderr
    status = hub.status()["routes"]["asr"]
    assert status["providers"]["v2"]["requests"] == counts["v2"] + 20 and status["providers"]["v2"]["errors"] == 0


def test_sticky_keys_never_flip_and_only_the_keys_that_must_move(hub_factory) -> None:
    route = {"providers": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}], "sticky": True}
    hub = hub_factory({"v1": echo(), "v2": echo()}, routes={"asr": route})
    keys = [f"user-{i}" for i in range(300)]
    with hub.client() as client:

        def placement() -> dict[str, str]:
            return {k: client.transcribe(TONE[:800], "asr", route_key=k).provider for k in keys}

        first, again = placement(), placement()
        assert first == again  # never flips while the weights stay
        assert first == {k: routes.sticky_pick({"v1": 90, "v2": 10}, k) for k in keys}
        client.route("asr", {"v1": 80, "v2": 20})
        moved = {k for k, p in placement().items() if p != first[k]}
    assert all(first[k] == "v1" for k in moved)  # keys move only to the provider that grew
    expected = {k for k in keys if routes.sticky_pick({"v1": 80, "v2": 20}, k) != first[k]}
    assert moved == expected and 0 < len(moved) < 80, len(moved)


def test_a_sighup_with_edited_weights_applies_them(hub_factory) -> None:
    hub = hub_factory({"v1": echo(), "v2": echo()}, routes={"asr": [{"provider": "v1", "weight": 1}]})
    assert providers_of(hub, "asr", 10) == Counter({"v1": 10})
    config = yaml.safe_load(hub.config_path.read_text())
    config["routes"]["asr"] = [{"provider": "v1", "weight": 0}, {"provider": "v2", "weight": 1}]
    hub.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    hub.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: hub.status()["routes"]["asr"]["weights"] == {"v1": 0.0, "v2": 1.0}, what="the reload")
    assert providers_of(hub, "asr", 10) == Counter({"v2": 10})


def test_the_rollback_script_sends_a_route_to_its_baseline(hub_factory) -> None:
    route = [{"provider": "v1", "weight": 50}, {"provider": "v2", "weight": 50}]
    hub = hub_factory({"v1": echo(), "v2": echo()}, routes={"asr": route})
    out = subprocess.run(
        ["scripts/rollback.sh", str(hub.config_path), "--route", "asr"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0 and "every request now goes to v1" in out.stdout, out.stdout + out.stderr
    assert providers_of(hub, "asr", 20) == Counter({"v1": 20})
    missing = subprocess.run(
        ["scripts/rollback.sh", str(hub.config_path), "--route", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert missing.returncode == 2 and "no route 'nope'" in missing.stderr


def _latencies(hub: Hub, route: str, n: int, use_shm: bool = True) -> list[float]:
    out = []
    with hub.client(use_shm=use_shm) as client:
        for _ in range(n):
            started = time.perf_counter()
            client.transcribe(TONE, route)
            out.append(time.perf_counter() - started)
    return out


def test_a_slow_shadow_never_delays_the_primary_and_is_dropped_when_busy(hub_factory) -> None:
    hub = hub_factory(
        {"v1": echo(), "slow": echo(sleep=1.0)},
        routes={
            "plain": [{"provider": "v1", "weight": 1}],
            "shadowed": {
                "providers": [{"provider": "v1", "weight": 1}],
                "shadow": {"provider": "slow", "fraction": 1.0},
            },
        },
    )
    plain = _latencies(hub, "plain", 30)
    shadowed = _latencies(hub, "shadowed", 30) + _latencies(hub, "shadowed", 10, use_shm=False)
    # the shadow sleeps a second; the primary never waits for it (loaded machine: compare medians, generously)
    assert max(shadowed) < 0.5, shadowed
    assert statistics.median(shadowed) <= 1.5 * statistics.median(plain) + 0.005, (plain, shadowed)
    wait_for(
        lambda: not hub.status()["routes"]["shadowed"]["shadow_requests"].get("slow compared", 0) < 1,
        what="a comparison",
    )
    counts = hub.status()["routes"]["shadowed"]["shadow_requests"]
    assert counts["slow dropped"] >= 30 and counts["slow compared"] + counts["slow dropped"] <= 40, counts
    wait_for(lambda: hub.status()["providers"]["slow"]["workers"][0]["state"] == "idle", what="the shadow to end")
    assert hub_segments(hub) == []  # every shadow's second name was removed


def test_a_failing_or_dying_shadow_never_fails_the_primary(hub_factory) -> None:
    hub = hub_factory(
        # fail_from=2: the start's health decode passes, so the shadows get ready and then fail their jobs
        {"v1": echo(), "bad": echo(fail="boom", fail_from=2), "dies": echo(exit=3, fail_from=2)},
        routes={
            "a": {"providers": [{"provider": "v1", "weight": 1}], "shadow": {"provider": "bad"}},
            "b": {"providers": [{"provider": "v1", "weight": 1}], "shadow": {"provider": "dies"}},
        },
    )
    with hub.client() as client:
        for route in ("a", "b"):
            for _ in range(5):
                assert client.transcribe(TONE, route).provider == "v1"
                time.sleep(0.1)
    wait_for(lambda: hub.status()["routes"]["a"]["shadow_requests"].get("bad failed", 0) >= 1, what="a failed shadow")
    wait_for(lambda: hub.status()["routes"]["b"]["shadow_requests"].get("dies failed", 0) >= 1, what="a lost shadow")
    assert hub.status()["providers"]["v1"]["failed"] == 0
    wait_for(lambda: hub_segments(hub) == [], what="the shadows' segments to go")


def test_a_failing_canary_is_rolled_back_and_the_baseline_is_untouched(hub_factory) -> None:
    analysis = {"min_requests": 30, "max_error_rate_increase": 0.05, "max_latency_ratio": 50}
    hub = hub_factory(
        {"v1": echo(), "v2": echo(fail_every=3), "v3": echo()},
        routes={
            "canary": {
                "providers": [{"provider": "v1", "weight": 1}, {"provider": "v2", "weight": 1}],
                "analysis": analysis,
            },
            "healthy": {
                "providers": [{"provider": "v1", "weight": 1}, {"provider": "v3", "weight": 1}],
                "analysis": analysis,
            },
        },
    )
    outcomes: Counter[str] = Counter()
    with hub.client() as client:
        for _ in range(200):
            for route in ("canary", "healthy"):
                try:
                    outcomes[client.transcribe(TONE[:1600], route).provider + " ok"] += 1
                except HubError as exc:
                    outcomes[exc.code] += 1
    status = hub.status()["routes"]
    assert status["canary"]["weights"] == {"v1": 1.0, "v2": 0.0}, status["canary"]
    assert "error rate" in status["canary"]["rolled_back"]["v2"] and status["canary"]["rollbacks"] == {"v2": 1}
    assert status["healthy"]["weights"] == {"v1": 1.0, "v3": 1.0} and status["healthy"]["rolled_back"] == {}
    assert status["canary"]["providers"]["v1"]["errors"] == 0 and hub.status()["providers"]["v1"]["failed"] == 0
    assert outcomes["INFERENCE_FAILED"] < 30, outcomes  # it stopped soon after its window filled
    assert "route canary: rolled back v2" in hub.log() and " ERROR " in hub.log()
    with hub.client() as client:
        client.route("canary", {"v1": 1, "v2": 1})  # an operator sets the weights again
    assert hub.status()["routes"]["canary"]["rolled_back"] == {}


def test_a_canary_that_cannot_start_is_routed_around_rolled_back_and_sessions_follow(hub_factory) -> None:
    """``v2`` never gets ready (its health decode at start fails, so it is degraded): no request or session of the
    route reaches it, nothing fails, and with an ``analysis:`` block it is rolled back with the reason; a shadow
    that cannot start gets no copy and, with analysis, is turned off."""
    analysis = {"min_requests": 30}
    hub = hub_factory(
        {"v1": echo(), "v2": echo(fail="this model cannot start"), "v3": echo()},
        routes={
            "plain": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}],
            "canary": {
                "providers": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}],
                "analysis": analysis,
            },
            "shadowed": {
                "providers": [{"provider": "v3", "weight": 1}],
                "shadow": {"provider": "v2", "fraction": 1.0},
                "analysis": analysis,
            },
        },
        ready=False,
    )
    wait_for(lambda: hub.status()["providers"]["v2"]["degraded"], timeout=30, what="v2 to be degraded")
    wait_for(
        lambda: (
            hub.status()["providers"]["v1"]["workers"]
            and all(w["state"] == "idle" for w in hub.status()["providers"]["v1"]["workers"])
        ),
        timeout=30,
        what="v1 to be ready",
    )
    wait_for(
        lambda: any(w["state"] == "idle" for w in hub.status()["providers"]["v3"]["workers"]), timeout=30, what="v3"
    )
    assert providers_of(hub, "plain", 200) == Counter({"v1": 200})
    assert providers_of(hub, "canary", 50) == Counter({"v1": 50})
    assert providers_of(hub, "shadowed", 20) == Counter({"v3": 20})
    with hub.client() as client:
        for _ in range(10):
            session = client.open_stream("plain")
            session.send(TONE)
            assert session.close().text and session.worker.startswith("v1-")
    routes_now = hub.status()["routes"]
    assert routes_now["plain"]["weights"] == {"v1": 90.0, "v2": 10.0} and routes_now["plain"]["rolled_back"] == {}
    assert routes_now["canary"]["weights"] == {"v1": 90.0, "v2": 0.0}
    assert "cannot serve: it is degraded" in routes_now["canary"]["rolled_back"]["v2"]
    assert (
        routes_now["shadowed"]["shadow"]["on"] is False and "as a shadow" in routes_now["shadowed"]["rolled_back"]["v2"]
    )
    assert "route canary: rolled back v2" in hub.log() and "route shadowed: rolled back v2" in hub.log()
    hub.faults_expected = True  # v2's failed starts are logged as errors


def test_prometheus_shows_the_routes(hub_factory) -> None:
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    hub = hub_factory(
        {"v1": echo(), "v2": echo()},
        hub={"metrics_port": port},
        routes={"asr": {"providers": [{"provider": "v1", "weight": 1}], "shadow": {"provider": "v2"}}},
    )
    with hub.client() as client:
        for _ in range(3):
            client.transcribe(TONE, "asr")
            time.sleep(0.05)
    wait_for(
        lambda: hub.status()["routes"]["asr"]["agreement_wer"].get("v2", {}).get("count", 0) >= 1, what="a comparison"
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        page = response.read().decode()
    assert 'asr_hub_route_requests_total{provider="v1",route="asr"} 3.0' in page
    assert 'asr_hub_route_agreement_wer_bucket{le="0.0",provider="v2",route="asr"}' in page  # echo agrees with echo
    assert 'asr_hub_route_latency_ratio_count{provider="v2",route="asr"}' in page
    assert 'asr_hub_route_weight{provider="v1",route="asr"} 1.0' in page


@pytest.mark.timeout(300)
def test_two_whisper_versions_agree_and_whisper_against_echo_does_not(hub_factory) -> None:
    whisper = {"type": "whisper", "model": "tiny.en", "cpu_threads": 1}
    hub = hub_factory(
        {"int8": {**whisper, "compute_type": "int8"}, "fp32": {**whisper, "compute_type": "float32"}, "echo": echo()},
        routes={
            "same": {"providers": [{"provider": "int8", "weight": 1}], "shadow": {"provider": "fp32"}},
            "other": {"providers": [{"provider": "int8", "weight": 1}], "shadow": {"provider": "echo"}},
        },
    )
    clips = ("hello", "coffee")
    with hub.client(timeout=120) as client:
        for clip in clips:
            text = client.transcribe(DATA / f"{clip}.wav", "same").text
            assert text.strip()
            wait_for(lambda: hub.status()["providers"]["fp32"]["workers"][0]["state"] == "idle", 60, "the shadow")
            client.transcribe(DATA / f"{clip}.wav", "other")
    wait_for(
        lambda: hub.status()["routes"]["same"]["agreement_wer"].get("fp32", {}).get("count") == 2, 60, "comparisons"
    )
    wait_for(
        lambda: hub.status()["routes"]["other"]["agreement_wer"].get("echo", {}).get("count") == 2, 60, "comparisons"
    )
    routes_status = hub.status()["routes"]
    assert routes_status["same"]["agreement_wer"]["fp32"]["mean"] <= 0.1, routes_status["same"]
    assert routes_status["other"]["agreement_wer"]["echo"]["mean"] >= 1.0, routes_status["other"]
    assert all(reference(c) for c in clips)
    wait_for(lambda: hub_segments(hub) == [], what="the shadows' segments to go")
