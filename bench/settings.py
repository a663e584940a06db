"""Settings every configuration shares, so the hub's workers and the bare processes run the same
model the same way and the comparisons differ only in what they are meant to compare."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from hub.config import ProviderConfig
from hub.supervisor import gpus
from hub.supervisor.process import worker_env

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny.en"


def compute_type(device: str) -> str:
    """int8 on the CPU (the bundled weights are float16, slow there), float16 on a GPU: what a user would pick."""
    return "float16" if device == "cuda" else "int8"


def process_env(threads: int, card: gpus.Card | None) -> dict[str, str]:
    """The environment the hub gives a worker with ``cpu_threads: threads`` on ``card`` (hub/supervisor/process.py itself)."""
    return worker_env(ProviderConfig(name="bench", type="whisper", cpu_threads=threads), card)


@cache
def hub_cards() -> tuple[gpus.Card, ...]:
    """The GPUs a hub started from here would use (hub/supervisor/gpus.py's rule): none without NVML or a mask."""
    return gpus.discover(os.environ, gpus.Nvml().devices()).cards


def pin(device: str, processes: int) -> list[gpus.Card | None]:
    """The cards ``processes`` workers of one provider get from the hub's placement, in start order."""
    if device != "cuda":
        return [None] * processes
    placed: list[gpus.Occupant] = []
    cards: list[gpus.Card | None] = []
    for _ in range(processes):
        card = gpus.place("bench", hub_cards(), placed, {}).card
        cards.append(card)
        if card is not None:
            placed.append(gpus.Occupant(card.ordinal, "bench", None, starting=True))
    return cards


def nvml_indices(cards: list[gpus.Card | None] | tuple[gpus.Card, ...]) -> tuple[int, ...]:
    """The NVML indices of the cards a measurement uses, for the GPU sampler."""
    return tuple(sorted({c.nvml_index for c in cards if c is not None and c.nvml_index is not None}))
