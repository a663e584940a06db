"""GPU placement, readings and readiness with real supervisors and real worker processes on a machine without
GPUs. The driver is replaced by ``tests/nvml_double/pynvml.py`` (first on the supervisor's PYTHONPATH), which
stands in for NVML only; echo workers with ``device: cuda`` go through placement like model workers.
What only a GPU host can show (CUDA ordinals against NVML indices, real memory, real decodes) is
``scripts/gpu_check.sh``'s job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, echo_provider, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

DOUBLE = ROOT / "tests" / "nvml_double"
WORKER_MB = 1024


def _card(n: int, used_mb: float = 0.0, total_mb: float = 16384) -> dict[str, Any]:
    return {
        "uuid": f"GPU-{n:08d}-0000-0000-0000-{n:012d}",
        "pci": f"00000000:{0x1A + 0x21 * n:02X}:00.0",
        "name": "NVIDIA L4",
        "total_mb": total_mb,
        "used_mb": used_mb,
        "utilization": 10 * n,
        "worker_mb": WORKER_MB,
    }


def _node(tmp_path: Path, cards: list[dict[str, Any]], **env: str) -> tuple[Path, dict[str, str]]:
    state = tmp_path / "nvml.json"
    state.write_text(json.dumps({"cards": cards}))
    return state, {"PYTHONPATH": str(DOUBLE), "ASR_HUB_TEST_NVML": str(state), **env}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_text()
    return dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)


def _gpu_echo(**pool: Any) -> dict[str, Any]:
    return {**echo_provider(**pool), "device": "cuda"}


def test_workers_of_all_providers_spread_over_an_inherited_mask_with_their_own_readings(hub_factory, tmp_path) -> None:
    cards = [_card(n) for n in range(4)]
    _, env = _node(tmp_path, cards, CUDA_VISIBLE_DEVICES="3,1")  # the scheduler gave this hub NVML 3 and 1
    providers = {
        "a": _gpu_echo(min_size=2, max_size=2),
        "b": _gpu_echo(min_size=2, max_size=2),
        "c": {**_gpu_echo(min_size=1, max_size=1), "devices": [1]},  # the mask's second card: NVML 1
    }
    hub = hub_factory(providers, env=env)
    allowed = {cards[3]["uuid"]: 3, cards[1]["uuid"]: 1}
    wait_for(
        lambda: all(
            w["gpu_memory_used_mb"] is not None for p in hub.status()["providers"].values() for w in p["workers"]
        ),
        what="per-process readings of every worker",
    )
    status = hub.status()["providers"]
    on_card: dict[int, list[str]] = {3: [], 1: []}
    for name, provider in status.items():
        for w in provider["workers"]:
            env_of = _environ(w["pid"])
            assert env_of["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            assert env_of["CUDA_VISIBLE_DEVICES"] in allowed  # never a card outside the inherited mask
            gpu = w["gpu"]
            assert (
                gpu["nvml_index"] == allowed[env_of["CUDA_VISIBLE_DEVICES"]]
                and gpu["uuid"] == env_of["CUDA_VISIBLE_DEVICES"]
            )
            assert gpu["ordinal"] == {3: 0, 1: 1}[gpu["nvml_index"]]
            assert gpu["pci_bus_id"] == f"0000:{0x1A + 0x21 * gpu['nvml_index']:02x}:00.0"
            assert w["device"] == "cuda" and w["gpu_memory_used_mb"] == WORKER_MB and w["gpu_error"] == ""
            assert w["gpu_card_total_mb"] == 16384 and w["gpu_utilization"] == 10 * gpu["nvml_index"]
            on_card[gpu["nvml_index"]].append(name)
    assert on_card[1].count("c") == 1 and on_card[3].count("c") == 0
    assert all({"a", "b"} <= set(names) for names in on_card.values()), on_card  # each provider on both cards
    for index, names in on_card.items():  # the card's used memory is every worker's on it, counted once each
        readings = {
            w["gpu_card_used_mb"] for p in status.values() for w in p["workers"] if w["gpu"]["nvml_index"] == index
        }
        assert readings == {WORKER_MB * len(names)}
    log = hub.log()
    assert "GPUs: CUDA_VISIBLE_DEVICES='3,1' inherited" in log and f"NVML 3, PCI 0000:{0x1A + 0x21 * 3:02x}:00.0" in log


def test_the_memory_cap_holds_a_spawn_back_on_a_card_filled_on_purpose(hub_factory, tmp_path) -> None:
    # 4096 MiB, 2000 held by another tenant; under 0.95 one 1024 MiB worker fits, a second does not
    state, env = _node(tmp_path, [_card(0, used_mb=2000, total_mb=4096)])
    pool = {"min_size": 1, "max_size": 2, "max_gpu_memory_fraction": 0.95}
    hub = hub_factory({"a": _gpu_echo(**pool)}, env=env)
    with hub.client() as client:
        wait_for(
            lambda: client.status()["providers"]["a"]["workers"][0]["gpu_memory_used_mb"] == WORKER_MB,
            what="a measured worker",
        )
        client.scale("a", 2)
        held = "GPU memory cap: one more a worker needs about 1024 MiB"
        wait_for(lambda: held in client.status()["providers"]["a"]["held_back"], what="the cap holding the spawn back")
        assert client.status()["providers"]["a"]["size"] == 1
        state.write_text(json.dumps({"cards": [_card(0, used_mb=0, total_mb=4096)]}))  # the tenant leaves
        wait_for(lambda: client.status()["providers"]["a"]["size"] == 2, what="the spawn once the card has room")


def test_a_failing_health_decode_is_a_load_failure_with_backoff(hub_factory) -> None:
    cuda_error = "CUDA failed with error CUBLAS_STATUS_NOT_INITIALIZED"
    hub = hub_factory({"echo": {**echo_provider(min_size=1, max_size=1), "options": {"fail": cuda_error}}}, ready=False)
    wait_for(lambda: hub.status()["providers"]["echo"]["degraded"], what="the provider degraded")
    echo = hub.status()["providers"]["echo"]
    assert "cannot decode the health clip" in echo["last_error"] and cuda_error in echo["last_error"]
    assert echo["workers_by_state"]["idle"] == 0 and echo["restart_backoff"] > 0
    assert "failed to load its model" in hub.log() and "next start in" in hub.log()


def test_auto_that_ends_on_the_cpu_warns_and_status_shows_the_cpu(hub_factory) -> None:
    # a mask naming a card this machine does not have: CTranslate2 sees no GPU, the worker runs on the CPU
    provider = {"model": "tiny.en", "device": "auto", "cpu_threads": 1, "pool": {"min_size": 1, "max_size": 1}}
    hub = hub_factory({"whisper": provider}, env={"CUDA_VISIBLE_DEVICES": "0"})
    worker = hub.status()["providers"]["whisper"]["workers"][0]
    assert worker["device"] == "cpu" and worker["gpu"] is None and "runs on cpu" in worker["gpu_error"]
    assert _environ(worker["pid"])["CUDA_VISIBLE_DEVICES"] == "0"
    log = hub.log()
    assert "WARNING workers" in log and "CTranslate2 sees no GPU although CUDA_VISIBLE_DEVICES='0'" in log
    assert "was placed on GPU 0 (CUDA_VISIBLE_DEVICES=0, no NVML identity) but its model runs on cpu" in log


def test_the_gpu_check_runs_and_fails_plainly_without_a_gpu() -> None:
    """The real check needs a GPU host; here it must still run, say why it fails, and exit non-zero."""
    import os
    import subprocess
    import sys

    from hub.supervisor.gpus import Nvml

    if Nvml().available:
        pytest.skip("this machine has an NVIDIA driver: run scripts/gpu_check.sh itself")
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        [str(ROOT / "scripts" / "gpu_check.sh"), "--no-bench"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL  GPUs found" in run.stdout and "NVML" in run.stdout and "0 PASS, 1 FAIL" in run.stdout


def test_the_gpu_metric_families_carry_each_workers_readings(hub_factory, tmp_path) -> None:
    """With an NVML (the double), the page has every documented family, the two GPU ones included, and they
    carry each worker's own memory and its card's utilisation, labelled by worker."""
    from tests.integration.test_monitoring import DOCUMENTED, _families, _sample

    cards = [_card(n) for n in range(2)]
    _, env = _node(tmp_path, cards)
    port = free_port()
    hub = hub_factory({"echo": _gpu_echo(min_size=2, max_size=2)}, hub={"metrics_port": port}, env=env)
    gpu = {"asr_hub_worker_gpu_memory_used_bytes", "asr_hub_worker_gpu_utilization"}
    wait_for(
        lambda: all(w["gpu_memory_used_mb"] is not None for w in hub.status()["providers"]["echo"]["workers"]),
        what="GPU readings",
    )
    workers = hub.status()["providers"]["echo"]["workers"]
    families = _families(
        port,
        lambda f: (
            gpu <= set(f)
            and all(
                any(s.labels.get("worker") == w["id"] for s in f["asr_hub_worker_gpu_memory_used_bytes"].samples)
                for w in workers
            )
        ),
    )
    assert gpu <= DOCUMENTED and DOCUMENTED <= {name for name in families if name.startswith("asr_hub_")}
    assert {w["gpu"]["nvml_index"] for w in workers} == {0, 1}  # one worker on each card
    for w in workers:
        labels = {"provider": "echo", "worker": w["id"]}
        assert _sample(families, "asr_hub_worker_gpu_memory_used_bytes", **labels) == WORKER_MB * 2**20
        assert _sample(families, "asr_hub_worker_gpu_utilization", **labels) == 10 * w["gpu"]["nvml_index"]
