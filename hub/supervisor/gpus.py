"""Which GPUs the hub may use, which one a new worker gets, and whether the memory cap lets it start.

Everything here but ``Nvml`` is a pure function of plain values, so placement, index
translation and the cap are tested with made-up cards. ``Nvml`` is the one adapter around
pynvml (the NVIDIA driver's library); tests hand it a stand-in module for the driver.

Three numberings meet here, and mixing them up puts a worker on one card and its readings on another:

- the *NVML index*: the driver's order, which is PCI bus order;
- the *CUDA ordinal*: CUDA's order, fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
  and counted within ``CUDA_VISIBLE_DEVICES`` when that is set;
- the *hub ordinal* (``Card.ordinal``): the position of a card among the GPUs the hub may use,
  which is what a provider's ``devices:`` lists and what a CUDA program started in the hub's
  environment with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` calls ``cuda:<ordinal>``.

A worker is pinned by the card's UUID where NVML gives one (order-proof), else by the
entry the hub inherited, and always with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PCI_ORDER = "PCI_BUS_ID"
NO_GPU_WORDS = ("", "void", "none", "NoDevFiles")  # NVIDIA_VISIBLE_DEVICES values meaning "no GPU"


@dataclass(frozen=True)
class NvmlDevice:
    """One device as NVML enumerates it."""

    index: int
    uuid: str
    pci_bus_id: str  # normalised, see ``normalize_pci``
    name: str = ""


@dataclass(frozen=True)
class Card:
    """A GPU the hub may use."""

    ordinal: int  # position among the hub's GPUs: what ``devices:`` indexes
    mask: str  # the worker's CUDA_VISIBLE_DEVICES when it runs on this card
    nvml_index: int | None = None  # None: NVML could not identify it (no driver readable, a MIG instance)
    pci_bus_id: str = ""
    uuid: str = ""

    def describe(self) -> str:
        """How the start log and error messages name the card."""
        known = (
            f", NVML {self.nvml_index}, PCI {self.pci_bus_id}" if self.nvml_index is not None else ", no NVML identity"
        )
        return f"GPU {self.ordinal} (CUDA_VISIBLE_DEVICES={self.mask}{known})"


@dataclass(frozen=True)
class Discovery:
    """The hub's GPUs and what an operator should hear about how they were found."""

    cards: tuple[Card, ...]
    source: str  # where the set came from, for the start log
    warnings: tuple[str, ...] = ()
    known: bool = True  # False: no mask and no NVML, so nobody knows what GPUs there are


@dataclass(frozen=True)
class CardReading:
    """One card's memory and load, with the GPU memory of each process on it; ``error`` when unreadable."""

    used_mb: float | None = None
    total_mb: float | None = None
    utilization: float | None = None
    processes: Mapping[int, float] = field(default_factory=dict)  # pid -> MiB
    error: str = ""

    @property
    def free_mb(self) -> float | None:
        return None if self.used_mb is None or self.total_mb is None else self.total_mb - self.used_mb


def normalize_pci(bus_id: str) -> str:
    """``domain:bus:device.function`` in lower-case hex with a 4-digit domain, whatever the source wrote:
    NVML writes ``00000000:3B:00.0``, the CUDA driver ``0000:3b:00.0``."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"
    except ValueError:
        return bus_id.strip().lower()


def discover(env: Mapping[str, str], devices: Sequence[NvmlDevice] | None) -> Discovery:
    """The GPUs the hub may use: those of an inherited ``CUDA_VISIBLE_DEVICES`` (Slurm, a user) or,
    without one, of ``NVIDIA_VISIBLE_DEVICES`` (the Kubernetes device plugin), else every NVML device.

    ``devices`` is NVML's list, None when NVML cannot be read. Mask entries follow CUDA's
    rules: integers, ``GPU-<uuid>`` (a unique prefix is enough) or ``MIG-<uuid>``; the first
    entry that is none of these ends the list. Integers are read in PCI order (NVML's), which
    is CUDA's order under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and on a node of identical GPUs.
    """
    if "CUDA_VISIBLE_DEVICES" in env:
        return _from_mask("CUDA_VISIBLE_DEVICES", env["CUDA_VISIBLE_DEVICES"], env, devices)
    plugin = env.get("NVIDIA_VISIBLE_DEVICES")
    if plugin is not None and plugin.strip() != "all":
        return _from_mask("NVIDIA_VISIBLE_DEVICES", plugin, env, devices)
    if devices is None:
        return Discovery((), "no GPU list: NVML is unreadable and no CUDA_VISIBLE_DEVICES was inherited", known=False)
    cards = tuple(_card(i, d) for i, d in enumerate(devices))
    return Discovery(cards, f"all {len(cards)} GPU(s) NVML lists")


def _card(ordinal: int, device: NvmlDevice) -> Card:
    return Card(ordinal, device.uuid or str(device.index), device.index, device.pci_bus_id, device.uuid)


def _from_mask(var: str, value: str, env: Mapping[str, str], devices: Sequence[NvmlDevice] | None) -> Discovery:
    source = f"{var}={value!r} inherited"
    if value.strip() in NO_GPU_WORDS:
        return Discovery((), f"{source}: no GPU")
    warnings: list[str] = []
    cards: list[Card] = []
    seen: set[str] = set()
    for entry in (e.strip() for e in value.split(",")):
        found, problem = _resolve(entry, devices)
        if problem:
            warnings.append(f"{var}: {problem}; the GPUs from there on are not used (CUDA stops there too)")
            break
        key = found.uuid if found is not None else entry
        if key in seen:
            continue
        seen.add(key)
        ordinal = len(cards)
        cards.append(_card(ordinal, found) if found is not None else Card(ordinal, entry))
    integers = any(e.strip().isdigit() for e in value.split(","))
    names = {d.name for d in devices or ()}
    if integers and len(names) > 1 and env.get("CUDA_DEVICE_ORDER") != PCI_ORDER:
        warnings.append(
            f"{var} holds indices and this node has different GPU models ({', '.join(sorted(names))}): they are "
            f"read in PCI order; set CUDA_DEVICE_ORDER={PCI_ORDER} where the mask is made, or use GPU UUIDs"
        )
    return Discovery(tuple(cards), source, tuple(warnings))


def _resolve(entry: str, devices: Sequence[NvmlDevice] | None) -> tuple[NvmlDevice | None, str]:
    """The NVML device a mask entry names (None where NVML cannot tell), or why the entry is invalid."""
    if entry.isdigit():
        if devices is None:
            return None, ""
        index = int(entry)
        if index >= len(devices):
            return None, f"{entry!r} is not a GPU index here (NVML lists {len(devices)})"
        return devices[index], ""
    if entry.startswith("MIG-") or (entry.startswith("GPU-") and devices is None):
        return None, ""
    if entry.startswith("GPU-"):
        matches = [d for d in devices or () if d.uuid.startswith(entry)]
        if len(matches) == 1:
            return matches[0], ""
        return None, f"{entry!r} matches {len(matches)} GPU UUIDs here, not one"
    return None, f"{entry!r} is neither an index nor a GPU-/MIG- UUID"


def provider_cards(devices: tuple[int, ...] | None, found: Discovery) -> tuple[tuple[Card, ...], str]:
    """The cards a provider's workers may use: ``devices`` as hub ordinals, or every card when omitted.

    Where nobody knows the GPUs (no mask, no NVML), listed ordinals are taken on trust as
    CUDA ordinals, and an omitted list means none. Returns the cards and a complaint about
    ordinals that are not the hub's ("" when none).
    """
    if devices is None:
        return found.cards, ""
    if not found.known:
        return tuple(Card(d, str(d)) for d in devices), ""
    cards = tuple(found.cards[d] for d in devices if d < len(found.cards))
    missing = [d for d in devices if d >= len(found.cards)]
    if not missing:
        return cards, ""
    return cards, (
        f"devices {missing} are not among the hub's {len(found.cards)} GPU(s) ({found.source}); "
        "devices: counts within that set, from 0"
    )


@dataclass(frozen=True)
class Occupant:
    """A worker that holds (or is about to hold) memory on a card: starting, idle, busy or draining."""

    ordinal: int
    provider: str
    memory_mb: float | None  # its own GPU memory as the driver reports it; None: not measured yet
    starting: bool = False


@dataclass(frozen=True)
class Placement:
    """Where a new worker goes, or why it does not start now (``card`` None and ``held_back`` set)."""

    card: Card | None
    held_back: str = ""


def need_mb(provider: str, occupants: Sequence[Occupant], remembered: float | None) -> float | None:
    """GPU memory one more worker of ``provider`` is expected to take: the most any of its measured
    workers uses (starting ones are still growing), else what its last measured worker used, else None."""
    measured = [o.memory_mb for o in occupants if o.provider == provider and not o.starting and o.memory_mb]
    return max(measured) if measured else remembered


def headroom_mb(
    reading: CardReading,
    fraction: float,
    ordinal: int,
    occupants: Sequence[Occupant],
    needs: Mapping[str, float | None],
) -> float | None:
    """Memory a new worker may still take on a card under ``fraction`` of its total, counting what starting
    workers there have yet to allocate (their provider's need less what they hold now). None: unreadable."""
    if reading.used_mb is None or reading.total_mb is None:
        return None
    pending = sum(
        max(0.0, (needs.get(o.provider) or 0.0) - (o.memory_mb or 0.0))
        for o in occupants
        if o.ordinal == ordinal and o.starting
    )
    return fraction * reading.total_mb - reading.used_mb - pending


def place(
    provider: str,
    cards: Sequence[Card],
    occupants: Sequence[Occupant],
    readings: Mapping[int, CardReading],
    fraction: float = 0.0,
    remembered: float | None = None,
) -> Placement:
    """The card for a new worker of ``provider``, spreading the workers of every provider over the cards.

    Least loaded first: the fewest workers of any provider, then the fewest of this
    provider (so one card's failure does not take a whole provider), then the least used
    memory (the driver's reading where there is one, else the measured memory of our
    workers), then the lowest ordinal. With the cap on (``fraction`` > 0), only cards whose
    headroom covers the provider's measured need are candidates, and a provider whose need is
    not known yet starts one worker at a time, the first load being the measurement.
    """
    if not cards:
        return Placement(None)
    candidates = list(cards)
    if fraction > 0:
        needs = {o.provider: need_mb(o.provider, occupants, None) for o in occupants}
        needs[provider] = need_mb(provider, occupants, remembered)
        need = needs[provider]
        if need is None:
            if any(o.provider == provider and o.starting for o in occupants):
                return Placement(
                    None, f"GPU memory cap: waiting for the first {provider} worker to load, to measure its need"
                )
        else:
            room = {
                c.ordinal: headroom_mb(readings.get(c.ordinal, CardReading()), fraction, c.ordinal, occupants, needs)
                for c in cards
            }
            candidates = [c for c in cards if (free := room[c.ordinal]) is None or free >= need]
            if not candidates:
                detail = ", ".join(f"GPU {c.ordinal} {max(0.0, room[c.ordinal] or 0.0):.0f} MiB" for c in cards)
                return Placement(
                    None,
                    f"GPU memory cap: one more {provider} worker needs about {need:.0f} MiB; room under "
                    f"pool.max_gpu_memory_fraction={fraction:g}: {detail}",
                )

    def load(card: Card) -> tuple[int, int, float, int]:
        here = [o for o in occupants if o.ordinal == card.ordinal]
        used = readings.get(card.ordinal, CardReading()).used_mb
        memory = used if used is not None else sum(o.memory_mb or 0.0 for o in here)
        return len(here), sum(1 for o in here if o.provider == provider), memory, card.ordinal

    return Placement(min(candidates, key=load))


def check_fraction(fraction: float) -> bool:
    """0 (off) or a share of a card's memory in (0, 1]."""
    return math.isfinite(fraction) and 0.0 <= fraction <= 1.0


class Nvml:
    """The NVIDIA driver, through pynvml, initialised once. Nothing here raises: without a driver
    (or without pynvml) ``devices`` is None and every reading carries ``error``."""

    def __init__(self, module: Any = None) -> None:
        self._nvml: Any = None
        self.error = ""
        try:
            if module is None:
                module = importlib.import_module("pynvml")
            module.nvmlInit()
            self._nvml = module
        except ImportError:
            self.error = "pynvml is not installed (pip install nvidia-ml-py)"
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: no driver here
            self.error = f"NVML unavailable: {exc}"

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def devices(self) -> list[NvmlDevice] | None:
        if self._nvml is None:
            return None
        nvml = self._nvml
        try:
            found = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                pci = nvml.nvmlDeviceGetPciInfo(handle)
                found.append(
                    NvmlDevice(
                        index,
                        _text(nvml.nvmlDeviceGetUUID(handle)),
                        normalize_pci(_text(pci.busId)),
                        _text(nvml.nvmlDeviceGetName(handle)),
                    )
                )
            return found
        except Exception as exc:
            self.error = f"NVML cannot list the GPUs: {exc}"
            return None

    def read(self, nvml_index: int) -> CardReading:
        if self._nvml is None:
            return CardReading(error=self.error)
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            load = nvml.nvmlDeviceGetUtilizationRates(handle)
            processes = {
                int(p.pid): p.usedGpuMemory / 2**20
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.usedGpuMemory is not None  # None where the driver cannot attribute memory (some vGPU, MIG setups)
            }
        except Exception as exc:
            return CardReading(error=f"NVML {nvml_index}: {exc}")
        return CardReading(memory.used / 2**20, memory.total / 2**20, float(load.gpu), processes)


def _text(value: str | bytes) -> str:
    """pynvml returns str in new releases and bytes in old ones."""
    return value.decode() if isinstance(value, bytes) else str(value)
