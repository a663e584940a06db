"""The typed status: ``to_dict`` gives the wire's keys exactly, ``from_dict`` reads old and new hubs, and
readiness is one rule. Pure tests on dicts shaped like a hub's answer, then one against a running hub."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from hub.client.__main__ import format_status
from hub.status import (
    FLAT,
    OMIT_NONE,
    GpuCard,
    HubStatus,
    PoolStatus,
    ProviderStatus,
    ReadyState,
    Wire,
    WorkerStatus,
)
from tests.conftest import Hub, echo_provider

pytestmark = pytest.mark.timeout(60)

WORKER = {
    "id": "whisper-1",
    "pid": 4242,
    "state": "idle",
    "device": "cuda",
    "gpu": {"ordinal": 0, "nvml_index": 1, "pci_bus_id": "00000000:3B:00.0", "uuid": "GPU-1234"},
    "cuda_pci_bus_id": "00000000:3B:00.0",
    "jobs_done": 7,
    "jobs_held": 2,
    "sessions": 1,
    "session_duty": 0.25,
    "session_turns": [{"id": "s-1", "step_s": 2.2, "duty": 0.25}],
    "consecutive_failures": 0,
    "rss_mb": 512.5,
    "since_health_check": 1.5,
    "slot": 0,
    "restarts": 1,
    "gpu_memory_used_mb": 900.0,
    "gpu_card_used_mb": 2000.0,
    "gpu_card_total_mb": 16000.0,
    "gpu_utilization": 35.0,
    "gpu_error": "",
    "uptime": 60.25,
    "last_error": "",
}
PERCENTILES = {"mean": 12.5, "p50": 10.0, "p95": 30.0, "p99": 40.0}
PROVIDER = {
    "type": "whisper",
    "enabled": True,
    "pool_enabled": True,
    "model": "tiny.en",
    "min_size": 1,
    "max_size": 2,
    "max_queue": 64,
    "requests": 9,
    "succeeded": 7,
    "failed": 1,
    "rejected": 1,
    "timed_out": 0,
    "session_resumes": 0,
    "pieces": 11,
    "errors": {"INFERENCE_FAILED": 1, "POOL_BUSY": 1},
    "success_rate": 0.875,
    "wait_ms": PERCENTILES,
    "inference_ms": {"mean": None, "p50": None, "p95": None, "p99": None},
    "utilization": 0.1,
    "throughput": 0.5,
    "mean_batch": 1.75,
    "workers_by_state": {"starting": 0, "idle": 1, "busy": 0, "draining": 0, "unhealthy": 0},
    "size": 1,
    "target_size": 1,
    "queue_depth": 0,
    "sessions": 1,
    "pieces_in_flight": 2,
    "degraded": False,
    "last_error": "",
    "restart_backoff": 0.0,
    "held_back": "",
    "workers": [WORKER],
}
DISABLED = {
    "type": "echo",
    "enabled": False,
    "pool_enabled": False,
    "model": "",
    "min_size": 1,
    "max_size": 1,
    "max_queue": 64,
    "size": 0,
    "queue_depth": 0,
    "workers": [],
}
SPREAD = {"count": 6, "mean": 0.0, "p50": 0.0, "p95": 0.0}
ROUTE = {
    "weights": {"whisper": 90.0, "echo": 10.0},
    "configured_weights": {"whisper": 90.0, "echo": 10.0},
    "sticky": True,
    "shadow": {"provider": "echo", "fraction": 0.5, "on": True},
    "analysis": {
        "whisper": {"requests": 5, "error_rate": 0.0, "p95_ms": 3.9},
        "echo": {"requests": 0, "error_rate": 0.0, "p95_ms": None},
    },
    "rolled_back": {"echo": "error rate 33.3%"},
    "providers": {"whisper": {"weight": 90.0, "requests": 6, "errors": 0}},
    "shadow_requests": {"echo compared": 6},
    "agreement_wer": {"echo": SPREAD},
    "latency_ratio": {"echo": SPREAD},
    "rollbacks": {"echo": 1},
}
STATUS: dict[str, Any] = {
    "hub": {
        "id": "70fe313d",
        "pid": 804,
        "version": "0.1.0",
        "frontend": "tcp://127.0.0.1:5791",
        "uptime": 1.4,
        "ready": True,
        "shutting_down": False,
        "dropped_replies": 0,
        "malformed_messages": 0,
        "inline_bytes": 0,
    },
    "providers": {"whisper": PROVIDER, "spare": DISABLED},
    "routes": {"asr": ROUTE},
    "gateway": {
        "pid": 99,
        "running": True,
        "url": "http://127.0.0.1:8000",
        "wyoming_port": None,
        "restarts": 0,
        "last_exit": "",
    },
}


def test_every_key_round_trips_unchanged() -> None:
    typed = HubStatus.from_dict(STATUS)
    assert typed.to_dict() == STATUS
    assert typed.providers["whisper"].workers[0].gpu == GpuCard(0, 1, "00000000:3B:00.0", "GPU-1234")
    assert typed.providers["spare"].pool is None and typed.routes["asr"].figures.rollbacks == {"echo": 1}


def test_a_hub_without_a_gateway_has_no_gateway_key() -> None:
    plain = {k: v for k, v in STATUS.items() if k != "gateway"}
    assert HubStatus.from_dict(plain).gateway is None and HubStatus.from_dict(plain).to_dict() == plain


def test_keys_from_a_newer_hub_are_ignored() -> None:
    newer = copy.deepcopy(STATUS)
    newer["hub"]["colour"] = "blue"
    newer["providers"]["whisper"]["workers"][0]["temperature_c"] = 71
    newer["providers"]["whisper"]["wait_ms"]["p999"] = 50.0
    newer["routes"]["asr"]["canary_started"] = 1.0
    newer["clusters"] = {}
    assert HubStatus.from_dict(newer).to_dict() == STATUS


def test_keys_an_older_hub_lacks_take_their_defaults() -> None:
    older = copy.deepcopy(STATUS)
    del older["routes"], older["gateway"], older["hub"]["inline_bytes"]
    for key in ("sessions", "held_back", "session_resumes", "pieces", "pieces_in_flight"):
        del older["providers"]["whisper"][key]
    del older["providers"]["whisper"]["workers"][0]["gpu"]
    typed = HubStatus.from_dict(older)
    assert typed.routes == {} and typed.gateway is None and typed.hub.inline_bytes == 0
    whisper = typed.providers["whisper"]
    assert whisper.pool is not None and (
        whisper.pool.sessions,
        whisper.pool.held_back,
        whisper.pool.figures.session_resumes,
    ) == (0, "", 0)
    assert (whisper.pool.pieces_in_flight, whisper.pool.figures.pieces) == (0, 0)
    assert whisper.pool.figures.requests == 9 and whisper.workers[0].gpu is None


def test_the_smallest_answer_still_reads() -> None:
    """What the gateway's and the pool's tests feed the readers: a few keys only."""
    typed = HubStatus.from_dict(
        {"hub": {"shutting_down": True}, "providers": {"echo": {"workers_by_state": {"idle": 2}}}}
    )
    assert typed.readiness is ReadyState.DRAINING
    echo = typed.providers["echo"]
    assert echo.enabled and echo.pool == PoolStatus(workers_by_state={"idle": 2}) and echo.workers == ()


def test_an_error_entry_of_a_pool_is_no_status() -> None:
    assert HubStatus.of({"error": {"code": "HUB_UNREACHABLE", "message": "gone"}}) is None
    assert HubStatus.of(STATUS) == HubStatus.from_dict(STATUS)


@pytest.mark.parametrize(
    ("ready", "draining", "readiness"),
    [
        (True, False, ReadyState.READY),
        (False, False, ReadyState.NOT_READY),
        (True, True, ReadyState.DRAINING),
        (False, True, ReadyState.DRAINING),
    ],
)
def test_readiness_is_ready_pools_and_not_draining(ready: bool, draining: bool, readiness: ReadyState) -> None:
    typed = HubStatus.from_dict({"hub": {"ready": ready, "shutting_down": draining}})
    assert typed.readiness is readiness and typed.ready is (readiness is ReadyState.READY)


def test_short_names_the_enabled_providers_below_min_size() -> None:
    def provider(enabled: bool, states: tuple[str, ...]) -> ProviderStatus:
        return ProviderStatus(enabled=enabled, min_size=2, workers=tuple(WorkerStatus(state=s) for s in states))

    status = HubStatus(
        providers={
            "full": provider(True, ("idle", "busy")),
            "loading": provider(True, ("idle", "starting", "draining")),
            "off": provider(False, ()),
        }
    )
    assert list(status.short()) == ["loading"] and status.providers["loading"].serving == 1


def test_a_running_hub_status_round_trips(hub_factory: Callable[..., Hub]) -> None:
    routes = {
        "r": {
            "providers": [{"provider": "v1", "weight": 90}, {"provider": "v2", "weight": 10}],
            "shadow": {"provider": "v3", "fraction": 1.0},
            "analysis": {"min_requests": 5},
        }
    }
    hub = hub_factory(
        {
            "v1": echo_provider(),
            "v2": echo_provider(max_size=1),
            "v3": echo_provider(max_size=1),
            "spare": {"type": "echo", "enabled": False},
        },
        routes=routes,
    )
    with hub.client() as client:
        for _ in range(3):
            client.transcribe(np.zeros(8000, np.float32), "r")
        status = client.status()
    typed = HubStatus.from_dict(status)
    assert typed.to_dict() == status
    assert typed.ready and typed.providers["spare"].pool is None and typed.routes["r"].shadow is not None
    assert typed.providers["v1"].pool is not None and typed.providers["v1"].pool.figures.requests >= 1


def test_the_cli_table_reads_the_typed_status() -> None:
    table = format_status(HubStatus.from_dict(STATUS))
    assert table.startswith("hub 70fe313d pid 804 on tcp://127.0.0.1:5791  ready  up 1 s")
    assert "whisper (whisper, pool): size 1 [1..2], queue 0/64" in table
    assert "requests 9: 7 ok, 1 failed, 1 rejected, 0 timed out (87.5% ok)" in table
    assert "wait p50/p95/p99 10/30/40 ms  inference -/-/- ms" in table
    assert "GPU 0: 900 MiB of 2000/16000 used, 35%" in table and "spare (echo): disabled" in table
    assert "route asr: whisper=90, echo=10  (sticky)" in table and "ROLLED BACK echo: error rate 33.3%" in table
    draining = copy.deepcopy(STATUS)
    draining["hub"]["shutting_down"] = True
    assert "  not ready  (shutting down)  " in format_status(HubStatus.from_dict(draining))


@dataclass(frozen=True)
class _Part(Wire):
    a: int = 0
    b: float | None = None


@dataclass(frozen=True)
class _Whole(Wire):
    name: str = ""
    part: _Part | None = field(default=None, metadata=FLAT)
    items: tuple[_Part, ...] = ()
    extra: _Part | None = field(default=None, metadata=OMIT_NONE)


def test_a_new_part_needs_only_its_fields_and_markers() -> None:
    """The codec reads the markers off any dataclass: a flat part's keys sit in its parent's dict (and it is
    None when none of them is there); an OMIT_NONE field has no key while None; tuples travel as lists."""
    whole = _Whole("w", _Part(1, None), (_Part(2, 0.5),), None)
    assert whole.to_dict() == {"name": "w", "a": 1, "b": None, "items": [{"a": 2, "b": 0.5}]}
    assert _Whole.from_dict(whole.to_dict()) == whole
    assert _Whole.from_dict({"name": "x", "extra": {"a": 3}}) == _Whole("x", None, (), _Part(3))
    assert _Whole("y").to_dict() == {"name": "y", "items": []}
