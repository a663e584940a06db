"""What the wire codecs cost: a hub's status with 80 workers encoded and decoded, and a config loaded.

Only the public API is used (``HubStatus.to_dict/from_dict``, ``parse_config``, ``load_config``), so the same
script measures any revision: compare two checkouts in one run (bench/README.md, "The codecs")::

    .venv/bin/python -m bench.codec [--repeat 7] [--baseline ../main]

``--baseline`` loads another checkout's ``hub/status.py`` and ``hub/config.py`` beside this one's and
measures both in the same run, taking turns, so a busy machine disturbs both alike. Each figure is the
best of ``--repeat`` rounds of enough calls to take about 0.2 s, in microseconds per call: the best round
is the one least disturbed by other processes on a shared machine. The last two lines are what a fresh
process pays once, in milliseconds (imports and the codec's set-up included), the best of ``--repeat``
fresh processes each.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub.config import load_config, parse_config
from hub.status import HubStatus

PROVIDERS = 4
WORKERS_PER_PROVIDER = 20  # 80 workers in all: a large host's hub
SAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "config" / "config.sample.yaml"


def worker(provider: str, i: int) -> dict[str, Any]:
    return {
        "id": f"{provider}-{i}",
        "pid": 1000 + i,
        "state": "busy" if i % 3 else "idle",
        "device": "cuda",
        "gpu": {
            "ordinal": i % 8,
            "nvml_index": i % 8,
            "pci_bus_id": f"00000000:{i % 8:02X}:00.0",
            "uuid": f"GPU-{i % 8}",
        },
        "cuda_pci_bus_id": f"00000000:{i % 8:02X}:00.0",
        "jobs_done": 10 * i,
        "sessions": i % 2,
        "session_duty": 0.25,
        "consecutive_failures": 0,
        "rss_mb": 512.5 + i,
        "since_health_check": 1.5,
        "slot": i,
        "restarts": 0,
        "gpu_memory_used_mb": 900.0,
        "gpu_card_used_mb": 2000.0,
        "gpu_card_total_mb": 16000.0,
        "gpu_utilization": 35.0,
        "gpu_error": "",
        "uptime": 60.25 + i,
        "last_error": "",
    }


def provider(name: str) -> dict[str, Any]:
    ms = {"mean": 12.5, "p50": 10.0, "p95": 30.0, "p99": 40.0}
    return {
        "type": "whisper",
        "enabled": True,
        "pool_enabled": True,
        "model": "tiny.en",
        "min_size": 1,
        "max_size": WORKERS_PER_PROVIDER,
        "max_queue": 64,
        "size": WORKERS_PER_PROVIDER,
        "queue_depth": 3,
        "requests": 900,
        "succeeded": 880,
        "failed": 10,
        "rejected": 10,
        "timed_out": 0,
        "session_resumes": 1,
        "errors": {"INFERENCE_FAILED": 10, "POOL_BUSY": 10},
        "success_rate": 0.978,
        "wait_ms": ms,
        "inference_ms": ms,
        "utilization": 0.7,
        "throughput": 12.5,
        "workers_by_state": {"starting": 0, "idle": 7, "busy": 13, "draining": 0, "unhealthy": 0},
        "target_size": WORKERS_PER_PROVIDER,
        "sessions": 10,
        "degraded": False,
        "last_error": "",
        "restart_backoff": 0.0,
        "held_back": "",
        "workers": [worker(name, i) for i in range(WORKERS_PER_PROVIDER)],
    }


def status_dict() -> dict[str, Any]:
    spread = {"count": 6, "mean": 0.0, "p50": 0.0, "p95": 0.0}
    route = {
        "weights": {"p0": 90.0, "p1": 10.0},
        "configured_weights": {"p0": 90.0, "p1": 10.0},
        "sticky": False,
        "shadow": {"provider": "p2", "fraction": 0.5, "on": True},
        "analysis": {
            "p0": {"requests": 5, "error_rate": 0.0, "p95_ms": 3.9},
            "p1": {"requests": 0, "error_rate": 0.0, "p95_ms": None},
        },
        "rolled_back": {},
        "providers": {"p0": {"weight": 90.0, "requests": 6, "errors": 0}},
        "shadow_requests": {"p2 compared": 6},
        "agreement_wer": {"p2": spread},
        "latency_ratio": {"p2": spread},
        "rollbacks": {},
    }
    return {
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
        "providers": {f"p{i}": provider(f"p{i}") for i in range(PROVIDERS)},
        "routes": {"asr": route},
        "gateway": {
            "pid": 99,
            "running": True,
            "url": "http://127.0.0.1:8000",
            "wyoming_port": None,
            "restarts": 0,
            "last_exit": "",
        },
    }


def config_dict() -> dict[str, Any]:
    """Eight echo providers with every pool key set, a route and a gateway: more than most hubs configure."""
    pool = {
        "min_size": 1,
        "max_size": 4,
        "max_queue": 64,
        "idle_timeout": 300,
        "acquire_timeout": 30.0,
        "health_check_interval": 60,
        "job_timeout": 60,
        "job_timeout_per_audio_second": 2.0,
        "retry_on_crash": 1,
        "max_consecutive_failures": 3,
        "max_jobs_per_worker": 0,
        "max_memory_mb": 0,
        "sessions_per_worker": 2,
        "session_idle_timeout": 30,
        "max_session_seconds": 3600,
    }
    providers = {
        f"e{i}": {
            "type": "echo",
            "device": "cpu",
            "cpu_threads": 1,
            "devices": [0, 1],
            "stream": {"step_ms": 1000, "window_seconds": 15.0},
            "pool": dict(pool),
        }
        for i in range(8)
    }
    return {
        "hub": {
            "frontend": "tcp://127.0.0.1:5555",
            "log_level": "INFO",
            "curve": {"server_secret_key": "", "allowed_clients": ""},
        },
        "gateway": {"enabled": True, "port": 8000, "model_aliases": {"big": "e0"}},
        "providers": providers,
        "routes": {
            "asr": {
                "providers": [{"provider": "e0", "weight": 90}, {"provider": "e1", "weight": 10}],
                "shadow": {"provider": "e2", "fraction": 0.5},
                "analysis": {"min_requests": 50},
            }
        },
    }


@dataclass(frozen=True)
class Codecs:
    """The public entry points of one checkout's wire modules."""

    status: Any  # the HubStatus class
    parse_config: Callable[[Any], Any]
    load_config: Callable[[Path], Any]


def this_tree() -> Codecs:
    return Codecs(HubStatus, parse_config, load_config)


def other_tree(root: Path) -> Codecs:
    """``hub/status.py`` and ``hub/config.py`` of another checkout, loaded beside this one's (their own imports
    of ``hub`` resolve to this tree: only those two modules are compared)."""
    modules = {}
    for name in ("status", "config"):
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", root / "hub" / f"{name}.py")
        assert spec is not None and spec.loader is not None, f"no hub/{name}.py under {root}"
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
        modules[name] = module
    return Codecs(modules["status"].HubStatus, modules["config"].parse_config, modules["config"].load_config)


def calls(codecs: Codecs) -> dict[str, Callable[[], object]]:
    wire = status_dict()
    typed = codecs.status.from_dict(wire)
    assert typed.to_dict() == wire, "the status does not round-trip"
    config = config_dict()
    codecs.parse_config(config)
    return {
        "status to_dict (80 workers)": typed.to_dict,
        "status to_dict + json.dumps": lambda: json.dumps(typed.to_dict()),
        "status from_dict (80 workers)": lambda: codecs.status.from_dict(wire),
        "parse_config (8 providers)": lambda: codecs.parse_config(config),
        "load_config (config.sample.yaml)": lambda: codecs.load_config(SAMPLE_CONFIG),
    }


COLD = {  # what a fresh interpreter runs, its input in argv[1]
    "status": "from hub.status import HubStatus\nHubStatus.from_dict(data).to_dict()",
    "config": "from hub.config import parse_config\nparse_config(data)",
}
TIMED = (
    "import json, sys, time\ndata = json.loads(sys.argv[1])\nstarted = time.perf_counter()\n{}\n"
    "print((time.perf_counter() - started) * 1e3)"
)


def cold_ms(root: Path, what: str, repeat: int) -> float:
    """A fresh interpreter's first status read and write, or its first config check, imports included (ms):
    what a process pays once. The best of ``repeat`` fresh processes."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    data = json.dumps(status_dict() if what == "status" else config_dict())
    args = [sys.executable, "-c", TIMED.format(COLD[what]), data]
    return min(
        float(subprocess.run(args, env=env, cwd=root, check=True, capture_output=True, text=True).stdout)
        for _ in range(repeat)
    )


def best_us(timers: list[timeit.Timer], repeat: int) -> list[float]:
    """Microseconds per call of each timer, from the best of ``repeat`` rounds of about 0.2 s each; the
    timers take turns round by round, so a busy spell of the machine hits them alike."""
    numbers = [timer.autorange()[0] for timer in timers]
    best = [float("inf")] * len(timers)
    for _ in range(repeat):
        for i, (timer, number) in enumerate(zip(timers, numbers, strict=True)):
            best[i] = min(best[i], timer.timeit(number) / number * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="rounds per figure; the best is kept")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. of main) to measure in the same run")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    roots = [here] if args.baseline is None else [args.baseline.resolve(), here]
    trees = [this_tree()] if args.baseline is None else [other_tree(args.baseline), this_tree()]
    measured = [calls(codecs) for codecs in trees]
    header = "µs per call" if args.baseline is None else "baseline µs   this µs   this/baseline"
    print(f"{'':36s} {header}")
    for name in measured[0]:
        us = best_us([timeit.Timer(m[name]) for m in measured], args.repeat)
        ratio = f"   {us[1] / us[0]:13.2f}" if len(us) == 2 else ""
        print(f"{name:36s} " + "  ".join(f"{u:10.1f}" for u in us) + ratio)
    for what, name in (("status", "first status read+write, ms"), ("config", "first parse_config, ms")):
        ms = [cold_ms(root, what, args.repeat) for root in roots]
        ratio = f"   {ms[1] / ms[0]:13.2f}" if len(ms) == 2 else ""
        print(f"{name:36s} " + "  ".join(f"{m:10.1f}" for m in ms) + ratio)


if __name__ == "__main__":
    main()
