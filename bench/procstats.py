"""Memory and CPU (and GPU, where readable) of the processes under test, read with psutil.

CPU is measured as the difference of cumulative counters over a run (no sampling thread,
so the meter itself costs nothing while requests flow); peak RSS is the kernel's
high-water mark, which sampling would miss between samples. GPU utilisation has no
cumulative counter, so it is sampled, and only when ``--device cuda`` asks for it.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil


def describe_machine() -> dict[str, Any]:
    """What the figures came from: they mean little without it."""
    model = ""
    try:
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    except OSError:
        pass
    return {
        "cores": len(os.sched_getaffinity(0)),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu": model or platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpu": _gpu_name(),
        "packages": {name: _version(name) for name in ("faster-whisper", "ctranslate2", "pyzmq", "numpy")},
    }


def _gpu_name() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)))
    except Exception:  # no package, no driver or no GPU
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (``VmHWM``); its current RSS where /proc has no such line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (a supervisor, its workers and gateway)."""
    root = psutil.Process(pid)
    return [root.pid, *(child.pid for child in root.children(recursive=True))]


def resident_mb(pids: list[int]) -> float:
    """The resident memory of these processes now, summed (pages they share count once per process, as in
    ``ps``); a process gone meanwhile counts nothing."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _cpu_seconds(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def _idle(times: Any) -> float:
    return float(times.idle + getattr(times, "iowait", 0.0))


class GpuSampler:
    """Mean utilisation and peak summed memory of the GPUs a measurement uses (NVML indices) while it runs,
    via pynvml (nvidia-ml-py) if present."""

    INTERVAL_S = 0.1

    def __init__(self, indices: tuple[int, ...]) -> None:
        self._stop = threading.Event()
        self._util: list[float] = []
        self._mem_mb = 0.0
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except Exception:  # no package, no driver, no GPU: the figure is simply not readable here
            self._nvml = None

    def start(self) -> None:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            loads = [float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self._handles]
            self._util.append(sum(loads) / len(loads))
            used = sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles) / 2**20
            self._mem_mb = max(self._mem_mb, used)

    def stop(self) -> dict[str, float | None]:
        if self._thread is None:
            return {"gpu_pct": None, "gpu_mem_mb": None}
        self._stop.set()
        self._thread.join()
        mean = sum(self._util) / len(self._util) if self._util else None
        return {"gpu_pct": mean, "gpu_mem_mb": self._mem_mb}


FOREIGN_LIMIT_PCT = 25.0  # other processes' CPU (% of one core) beyond which a measurement is disturbed


def disturbed(usage: dict[str, Any]) -> bool:
    """Whether other processes used enough CPU during a measurement to make its figures doubtful."""
    return bool(usage.get("foreign_pct", 0.0) > FOREIGN_LIMIT_PCT)


def wait_for_quiet(max_wait_s: float, busy_limit_pct: float = 25.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine is nearly idle: less than ``busy_limit_pct`` of one
    core busy over half a second. Called between measurements, when our own processes are idle, so
    anything busy belongs to someone else (on a shared machine: another test run). Returns the wait."""
    started = time.perf_counter()
    cores = psutil.cpu_count() or 1
    while psutil.cpu_percent(interval=0.5) * cores > busy_limit_pct:
        if time.perf_counter() - started >= max_wait_s:
            break
    return time.perf_counter() - started


class Meter:
    """CPU used during a run: the whole machine (% of all cores busy) and each group of processes
    (% of one core, so 200 means two cores' worth), e.g. ``{"workers": [...], "hub": [pid]}``.
    ``foreign_pct`` is what the machine spent beyond those groups (same unit): other processes
    competing with the measurement, so a cell with a large value is suspect. With ``settle_s``,
    it first waits up to that long for the machine to be quiet."""

    def __init__(self, groups: dict[str, list[int]], gpus: tuple[int, ...] = (), settle_s: float = 0.0) -> None:
        self.groups = groups
        self.settle_s = settle_s
        self.usage: dict[str, float | None] = {}
        self._gpu = GpuSampler(gpus) if gpus else None

    def __enter__(self) -> Meter:
        self._waited = wait_for_quiet(self.settle_s) if self.settle_s > 0 else 0.0
        self._machine = psutil.cpu_times()
        self._procs = {name: sum(_cpu_seconds(p) for p in pids) for name, pids in self.groups.items()}
        self._started = time.perf_counter()
        if self._gpu is not None:
            self._gpu.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        wall = time.perf_counter() - self._started
        machine = psutil.cpu_times()
        total = sum(machine) - sum(self._machine)
        busy = total - (_idle(machine) - _idle(self._machine))
        machine_pct = 100 * busy / total if total > 0 else 0.0
        self.usage = {"machine_pct": machine_pct, "waited_for_quiet_s": self._waited}
        for name, pids in self.groups.items():
            used = sum(_cpu_seconds(p) for p in pids) - self._procs[name]
            self.usage[f"{name}_pct"] = 100 * used / wall
        ours = sum(self.usage[f"{name}_pct"] or 0.0 for name in self.groups)
        self.usage["foreign_pct"] = max(0.0, machine_pct * (psutil.cpu_count() or 1) - ours)
        if self._gpu is not None:
            self.usage.update(self._gpu.stop())
