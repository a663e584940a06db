"""A stand-in for pynvml (the NVIDIA driver's library) for supervisors started by tests: it is first on their
PYTHONPATH. It stands in for the driver only; the supervisor, its placement and its workers are the real ones.

The cards come from the JSON file $ASR_HUB_TEST_NVML, read at every call so a test can change them:
``{"cards": [{"uuid", "pci", "name", "total_mb", "used_mb", "utilization", "worker_mb"}]}``. ``used_mb`` is
what other tenants hold. Like the driver, it attributes memory to processes: every child of the calling
process (the supervisor's workers) whose ``CUDA_VISIBLE_DEVICES`` names a card holds ``worker_mb`` on it.
"""

import json
import os
import types

import psutil


class NVMLError(Exception):
    pass


def _cards():
    with open(os.environ["ASR_HUB_TEST_NVML"]) as f:
        return json.load(f)["cards"]


def _processes(index):
    card = _cards()[index]
    found = []
    for child in psutil.Process().children():
        try:
            mask = child.environ().get("CUDA_VISIBLE_DEVICES", "")
        except psutil.Error:
            continue
        if mask in (card["uuid"], str(index)):
            found.append(types.SimpleNamespace(pid=child.pid, usedGpuMemory=int(card["worker_mb"] * 2**20)))
    return found


def nvmlInit():
    _cards()


def nvmlDeviceGetCount():
    return len(_cards())


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < len(_cards()):
        raise NVMLError(f"no GPU {index}")
    return index


def nvmlDeviceGetUUID(handle):
    return _cards()[handle]["uuid"]


def nvmlDeviceGetName(handle):
    return _cards()[handle]["name"]


def nvmlDeviceGetPciInfo(handle):
    return types.SimpleNamespace(busId=_cards()[handle]["pci"].encode())


def nvmlDeviceGetComputeRunningProcesses(handle):
    return _processes(handle)


def nvmlDeviceGetMemoryInfo(handle):
    card = _cards()[handle]
    used = card["used_mb"] + sum(p.usedGpuMemory for p in _processes(handle)) / 2**20
    return types.SimpleNamespace(used=used * 2**20, free=(card["total_mb"] - used) * 2**20, total=card["total_mb"] * 2**20)


def nvmlDeviceGetUtilizationRates(handle):
    return types.SimpleNamespace(gpu=_cards()[handle]["utilization"], memory=0)
