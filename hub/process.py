"""Starting, stopping and explaining worker processes.

Workers are fresh interpreters (``python -m workers``), never forks of the supervisor, so
no model library state is ever inherited. A worker's GPU is chosen by the environment
it starts with (``CUDA_VISIBLE_DEVICES``), since CUDA reads it once, at import.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from hub.config import ProviderConfig
from hub.protocol import ExitCode, WorkerSpec

MAX_BACKOFF = 60.0


def worker_env(provider: ProviderConfig, gpu: int | None) -> dict[str, str]:
    """The environment of a worker: its one GPU (or none) and thread counts matching ``cpu_threads``."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    if provider.cpu_threads > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(provider.cpu_threads)
    return env


def gpu_for(provider: ProviderConfig, in_use: list[int]) -> int | None:
    """The GPU for a new worker: the listed device with the fewest of this provider's live workers
    (round-robin while the pool grows, and still balanced after a crash). A ``cpu`` provider gets none."""
    if provider.device == "cpu" or provider.type == "echo":
        return None
    return min(provider.devices, key=lambda gpu: (in_use.count(gpu), provider.devices.index(gpu)))


def spawn(spec: WorkerSpec, provider: ProviderConfig, gpu: int | None) -> subprocess.Popen[bytes]:
    """Start a worker; its stdout and stderr are the supervisor's, so its log lines reach the operator."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--spec", spec.to_json()],
        env=worker_env(provider, gpu),
        stdin=subprocess.DEVNULL,
    )


def terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()


def describe_exit(code: int) -> str:
    """A human reading of a worker's exit status."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    meanings = {
        ExitCode.OK: "exited normally",
        ExitCode.BOOT_ERROR: "failed to boot",
        ExitCode.MODEL_LOAD_ERROR: "failed to load its model",
    }
    return f"exit status {code} ({meanings.get(code, 'crashed')})"


def backoff(failures: int) -> float:
    """Seconds to wait before the next start after ``failures`` model-load failures in a row: 1, 2, 4 ... 60."""
    return min(MAX_BACKOFF, 2.0 ** max(0, failures - 1))
