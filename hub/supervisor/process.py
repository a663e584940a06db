"""Starting, stopping and explaining worker processes.

Workers are fresh interpreters (``python -m workers``), never forks of the supervisor, so
no model library state is ever inherited. A worker's GPU is chosen by the environment
it starts with (``CUDA_VISIBLE_DEVICES``, with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that an
index means the same card to CUDA as to NVML), since CUDA reads both once, at import.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from typing import Protocol

import zmq

from hub.config import ProviderConfig
from hub.protocol import ExitCode, WorkerSpec
from hub.provider_types import PROVIDER_TYPES
from hub.supervisor.gpus import PCI_ORDER, Card
from hub.supervisor.resources import rss_mb

MAX_BACKOFF = 60.0


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")  # set to a worker's cpu_threads


def worker_env(provider: ProviderConfig, card: Card | None) -> dict[str, str]:
    """The environment of a worker: its one GPU (or none, an empty mask) and thread counts matching ``cpu_threads``.

    The card's mask is one of the hub's own GPUs (see ``hub.gpus.discover``), so a worker
    never sees a GPU outside a ``CUDA_VISIBLE_DEVICES`` the hub inherited.
    """
    env = dict(os.environ)
    env["CUDA_DEVICE_ORDER"] = PCI_ORDER
    env["CUDA_VISIBLE_DEVICES"] = "" if card is None else card.mask
    if card is not None and (libraries := cuda_library_dirs()):
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    if provider.cpu_threads > 0:
        for var in THREAD_VARS:
            env[var] = str(provider.cpu_threads)
    return env


def cuda_library_dirs() -> list[str]:
    """The library directories of the ``cuda`` extra's wheels (cuBLAS, cuDNN), where installed. CTranslate2
    dlopens ``libcublas.so.12`` by name, which the loader finds only on ``LD_LIBRARY_PATH`` or in the system's
    paths, not inside site-packages."""
    found = []
    for package in ("nvidia.cublas", "nvidia.cudnn"):
        try:
            spec = importlib.util.find_spec(package)
        except ImportError:
            continue
        for root in spec.submodule_search_locations or () if spec else ():
            if os.path.isdir(lib := os.path.join(root, "lib")):
                found.append(lib)
    return found


def uses_gpu(provider: ProviderConfig) -> bool:
    """Whether the provider's workers are placed on a GPU (its type's device rule)."""
    return PROVIDER_TYPES[provider.type].uses_gpu(provider.device)


def spawn(spec: WorkerSpec, provider: ProviderConfig, card: Card | None) -> subprocess.Popen[bytes]:
    """Start a worker; its stdout and stderr are the supervisor's, so its log lines reach the operator."""
    return subprocess.Popen(
        [sys.executable, "-m", "workers", "--spec", spec.to_json()],
        env=worker_env(provider, card),
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


class Proc(Protocol):
    """What the workforce uses of a worker process (``subprocess.Popen`` is one; tests give a double)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


class WorkerIO(Protocol):
    """The workforce's hands: every process, socket and reading it touches. ``ProcessIO`` is the real one;
    the unit tests drive the supervisor core with a double and a fake clock."""

    def spawn(self, spec: WorkerSpec, provider: ProviderConfig, card: Card | None) -> Proc: ...

    def send(self, worker_id: str, frames: list[bytes]) -> Exception | None: ...

    def terminate(self, proc: Proc) -> None: ...

    def kill(self, proc: Proc) -> None: ...

    def rss_mb(self, pid: int) -> float: ...

    def stop_all(self, procs: list[Proc], grace: float) -> None: ...


class ProcessIO:
    """Real processes, the backend ROUTER socket and ``/proc`` readings."""

    def __init__(self, backend: zmq.Socket) -> None:
        self.backend = backend

    def spawn(self, spec: WorkerSpec, provider: ProviderConfig, card: Card | None) -> subprocess.Popen[bytes]:
        return spawn(spec, provider, card)

    def send(self, worker_id: str, frames: list[bytes]) -> zmq.ZMQError | None:
        """The socket is ROUTER_MANDATORY: a dead peer raises, and the error is returned, nothing dropped."""
        try:
            self.backend.send_multipart([worker_id.encode(), *frames])
        except zmq.ZMQError as exc:
            return exc
        return None

    def terminate(self, proc: Proc) -> None:
        terminate(proc)  # type: ignore[arg-type]

    def kill(self, proc: Proc) -> None:
        kill(proc)  # type: ignore[arg-type]

    def rss_mb(self, pid: int) -> float:
        return rss_mb(pid)

    def stop_all(self, procs: list[Proc], grace: float) -> None:
        """After STOP went to each: wait, then SIGTERM, wait, then SIGKILL, wait (each wait at most ``grace``)."""
        popens: list[subprocess.Popen[bytes]] = procs  # type: ignore[assignment]
        _wait_all(popens, min(grace, 2.0))
        for proc in popens:
            terminate(proc)
        _wait_all(popens, grace)
        for proc in popens:
            kill(proc)
        _wait_all(popens, grace)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
