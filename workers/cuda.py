"""What this process's CUDA runtime sees, asked of the CUDA driver (``libcuda``) directly with ctypes.

The model libraries do not say which physical card ``cuda:0`` is. The driver API does
(``cuDeviceGetPCIBusId``), with no library beyond the driver itself, so a GPU worker can tell the
supervisor the PCI bus id of the card it really got, and ``scripts/gpu_check.py`` can compare
CUDA ordinals with NVML indices.
"""

from __future__ import annotations

import ctypes
import logging
import os

_BUS_ID_LEN = 32
log = logging.getLogger("workers")


def visible_pci_bus_ids() -> list[str]:
    """The PCI bus id of each CUDA device this process sees, in CUDA ordinal order; [] without a driver.

    Reads ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` as CUDA does, since they are
    in this process's environment; ``cuInit`` is idempotent and creates no context.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    found = []
    for ordinal in range(count.value):
        device = ctypes.c_int(0)
        buffer = ctypes.create_string_buffer(_BUS_ID_LEN)
        if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            break
        if cuda.cuDeviceGetPCIBusId(buffer, _BUS_ID_LEN, device) != 0:
            break
        found.append(buffer.value.decode())
    return found


def warn_cpu_fallback(library: str) -> None:
    """``device: auto`` ending on the CPU: a WARNING where the hub gave this worker a GPU (a mask that
    names no usable card, a CPU-only build), a note where it gave none (a host without GPUs)."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if mask:
        log.warning("device auto: %s sees no GPU although CUDA_VISIBLE_DEVICES=%r; running on the CPU", library, mask)
    else:
        log.info("device auto: no GPU given to this worker; running on the CPU")
