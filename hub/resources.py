"""Readings of the machine: a process's memory (psutil) and a GPU's memory and load (NVML).

NVML is optional: without an NVIDIA driver every GPU reading says why it is missing
instead of failing, so the same supervisor runs on a laptop and on a GPU server.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB, 0.0 when the process is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


@dataclass(frozen=True)
class GpuReading:
    """One GPU's state; ``error`` is set (and the numbers are None) when it could not be read."""

    index: int
    used_mb: float | None = None
    free_mb: float | None = None
    total_mb: float | None = None
    utilization: float | None = None  # percent of time a kernel ran over the last sample period
    error: str = ""


class Gpus:
    """NVML, initialised once; ``read`` never raises."""

    def __init__(self) -> None:
        self._nvml = None
        self.error = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except ImportError:
            self.error = "pynvml is not installed (pip install nvidia-ml-py)"
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: no driver here
            self.error = f"NVML unavailable: {exc}"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self, index: int) -> GpuReading:
        if self._nvml is None:
            return GpuReading(index, error=self.error)
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            load = nvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as exc:
            return GpuReading(index, error=f"GPU {index}: {exc}")
        return GpuReading(
            index,
            used_mb=memory.used / 2**20,
            free_mb=memory.free / 2**20,
            total_mb=memory.total / 2**20,
            utilization=float(load.gpu),
        )
