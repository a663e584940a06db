"""Readings of the machine: a process's memory (psutil). GPU readings are ``hub.gpus.Nvml``'s."""

from __future__ import annotations

import psutil


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB, 0.0 when the process is gone."""
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
