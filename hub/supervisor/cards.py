"""The GPUs as the workforce sees them: the cards the hub may use, their last NVML reading, the card a new
worker goes to, and what a worker's READY and its memory readings say about its card.

The mechanism around the pure decisions of ``hub.gpus`` (discovery, placement, the memory cap):
one NVML reading per card per sampling pass, shared by the workers on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from hub.supervisor import gpus, process
from hub.supervisor.pool import ProviderPool, WorkerHandle, WorkerState

log = logging.getLogger("hub.supervisor")


class Cards:
    """The hub's GPUs and their readings; ``place`` picks a new worker's card."""

    def __init__(self) -> None:
        self.nvml = gpus.Nvml()
        self.found = gpus.discover(os.environ, self.nvml.devices())
        self.readings: dict[int, gpus.CardReading] = {}  # hub ordinal -> last reading of that card
        self.device_problems: dict[str, str] = {}  # a provider's devices outside the hub's GPUs, logged once
        _log_discovery(self.found, self.nvml)
        self.read()  # the first placements see what other tenants already hold

    @property
    def error(self) -> str:
        """Why NVML gives no readings ("" when it does)."""
        return self.nvml.error

    def read(self) -> None:
        """One NVML reading per card per sampling pass, shared by the workers on it."""
        self.readings = {
            card.ordinal: self.nvml.read(card.nvml_index)
            if card.nvml_index is not None
            else gpus.CardReading(error=self.nvml.error or f"{card.describe()} has no NVML identity")
            for card in self.found.cards
        }

    def check_ready(self, worker: WorkerHandle, body: dict[str, Any]) -> None:
        """A GPU worker whose model ended on the CPU stops counting as a GPU worker; one whose CUDA reports
        another card than the one it was placed on is logged (status shows both)."""
        if worker.card is None:
            return
        if not worker.device.startswith("cuda"):
            log.warning(
                "worker %s was placed on %s but its model runs on %s; it no longer counts as a GPU worker",
                worker.id,
                worker.card.describe(),
                worker.device,
            )
            worker.card = None
            worker.gpu_error = f"placed on a GPU, runs on {worker.device}"
            return
        worker.cuda_pci_bus_id = gpus.normalize_pci(str(body.get("cuda_pci_bus_id", "")))
        if worker.card.pci_bus_id and worker.cuda_pci_bus_id and worker.cuda_pci_bus_id != worker.card.pci_bus_id:
            log.error(
                "worker %s was placed on %s but its CUDA runtime reports PCI %s",
                worker.id,
                worker.card.describe(),
                worker.cuda_pci_bus_id,
            )

    def sample(self, pool: ProviderPool, worker: WorkerHandle) -> None:
        """A worker's GPU figures from this pass's reading of its card; a pool learns what one worker needs."""
        if worker.card is None:
            return
        reading = self.readings.get(worker.card.ordinal) or gpus.CardReading(error=self.nvml.error or "no NVML reading")
        worker.gpu_card_used_mb, worker.gpu_card_total_mb = reading.used_mb, reading.total_mb
        worker.gpu_utilization = reading.utilization
        worker.gpu_used_mb = reading.processes.get(worker.pid)
        if reading.error:
            worker.gpu_error = reading.error
        elif worker.gpu_used_mb is None:
            worker.gpu_error = (
                "the driver lists no GPU memory for this pid (not allocated yet, or a container's PID namespace "
                "hides the worker's pid from it)"
            )
        else:
            worker.gpu_error = ""
            if worker.state is not WorkerState.STARTING:
                pool.gpu_need_mb = max(pool.gpu_need_mb or 0.0, worker.gpu_used_mb)

    def place(self, pool: ProviderPool, pools: Iterable[ProviderPool]) -> gpus.Placement:
        """The card for a new worker of ``pool``, weighing the workers of every pool already on the cards."""
        provider = pool.config
        if not process.uses_gpu(provider):
            return gpus.Placement(None)
        cards, problem = gpus.provider_cards(provider.devices, self.found)
        if problem and self.device_problems.get(pool.name) != problem:
            log.error("provider %s: %s", pool.name, problem)
            self.device_problems[pool.name] = problem
        occupants = [
            gpus.Occupant(w.card.ordinal, w.provider, w.gpu_used_mb, w.state is WorkerState.STARTING)
            for p in pools
            for w in p.workers.values()
            if w.card is not None
        ]
        return gpus.place(
            pool.name, cards, occupants, self.readings, provider.pool.max_gpu_memory_fraction, pool.gpu_need_mb
        )


def _log_discovery(found: gpus.Discovery, nvml: gpus.Nvml) -> None:
    """Say once, at start, which GPUs the hub will use and how it found them."""
    for warning in found.warnings:
        log.warning("GPUs: %s", warning)
    if found.cards:
        log.info("GPUs: %s: %s", found.source, "; ".join(card.describe() for card in found.cards))
    else:
        log.info("GPUs: none (%s)", found.source if found.known else nvml.error or found.source)
