"""SIGHUP reloads beyond a plain rolling restart: providers added, removed or disabled, the run-time size floor,
and an old worker leased by a live session."""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np
import pytest
import yaml

from hub.errors import HubError, ProviderUnavailable, UnknownProvider
from tests.conftest import Hub, echo_provider, wait_for
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(120)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
STEPS = np.concatenate([np.full(8000, 0.01 * (i + 1), dtype=np.float32) for i in range(4)])


def reload(hub: Hub, providers: dict[str, Any]) -> None:
    """Write ``providers`` into the hub's config file and send SIGHUP."""
    config = yaml.safe_load(hub.config_path.read_text())
    config["providers"] = providers
    hub.config_path.write_text(yaml.safe_dump(config))
    hub.proc.send_signal(signal.SIGHUP)


def provider(hub: Hub, name: str) -> dict[str, Any]:
    return hub.status()["providers"][name]


def test_providers_added_removed_and_disabled_by_a_reload(hub_factory) -> None:
    one = echo_provider(min_size=1, max_size=1)
    hub = hub_factory({"keep": one, "off": one, "gone": one})
    outcomes: dict[str, list[str]] = {"off": [], "gone": []}

    def run(name: str) -> None:
        with hub.client() as client:
            try:
                outcomes[name].append(client.transcribe(TONE, name, sleep=2.0, timeout=60).text)
            except HubError as exc:
                outcomes[name].append(exc.code)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("off", "gone") for _ in range(2)]
    for t in threads:
        t.start()
    # in each of the two pools, one job runs and one waits in the queue
    wait_for(lambda: all(provider(hub, n)["queue_depth"] == 1 for n in ("off", "gone")), what="a queued job in each")
    reload(hub, {"keep": one, "off": {**one, "enabled": False}, "new": one})
    for t in threads:
        t.join(60)
    # the running job finishes on its draining worker; the queued one is failed at once
    assert sorted(outcomes["off"]) == sorted(outcomes["gone"]) == sorted([echo_text(TONE), "PROVIDER_UNAVAILABLE"]), (
        outcomes
    )
    wait_for(lambda: provider(hub, "new")["size"] == 1, what="the new provider's worker")
    with hub.client() as client:
        assert client.transcribe(TONE, "new").text == echo_text(TONE)
        assert client.transcribe(TONE, "keep").text == echo_text(TONE)
        with pytest.raises(ProviderUnavailable, match="disabled"):
            client.transcribe(TONE, "off")
        with pytest.raises(UnknownProvider, match="no provider named 'gone'"):
            client.transcribe(TONE, "gone")
    wait_for(lambda: provider(hub, "off")["workers"] == [], what="the disabled provider's worker to stop")
    assert "gone" not in hub.status()["providers"]
    assert "provider off left the config" in hub.log() and "provider gone left the config" in hub.log()


def test_a_reload_resets_the_scale_floor_to_min_size(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=3, idle_timeout=0.5)})
    with hub.client() as client:
        client.scale("echo", 3)
        wait_for(lambda: provider(hub, "echo")["size"] == 3, what="scale to 3")
        assert provider(hub, "echo")["target_size"] == 3  # the floor holds idle workers above min_size
        hub.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in hub.log(), what="the reload")
        wait_for(lambda: provider(hub, "echo")["size"] == 1, what="idle workers above min_size retired")
        assert provider(hub, "echo")["target_size"] == 1
        assert client.transcribe(TONE).text == echo_text(TONE)


def test_an_old_worker_leased_by_a_live_session_drains_when_the_session_ends(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=2, max_sessions=1)})
    with hub.client() as client:
        session = client.open_stream()
        old = session.worker
        session.send(STEPS[:16000])
        hub.proc.send_signal(signal.SIGHUP)
        # the old worker keeps serving its session, marked draining once the new generation is up (a second
        # old-generation worker the pool may have started for the leased one is replaced first)
        wait_for(
            lambda: {w["id"]: w["state"] for w in provider(hub, "echo")["workers"]}[old] == "draining",
            what="the old worker to drain",
        )
        assert client.transcribe(TONE).worker != old  # new jobs go to the new generation
        session.send(STEPS[16000:])
        assert {w["id"]: w["state"] for w in provider(hub, "echo")["workers"]}[old] == "draining"
        transcript = session.close()
        assert transcript.text == " ".join(f"a{10 * (i + 1)}" for i in range(4)), transcript.text
        wait_for(lambda: old not in {w["id"] for w in provider(hub, "echo")["workers"]}, what="the old worker to stop")
