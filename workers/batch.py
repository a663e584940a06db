"""Decoding several jobs in one forward pass: which items may share one, and the safety net around it.

Items share a forward pass only when their options are the same (the same task, language, beam,
prompt, ...): a batch of one model call has one set of decoding settings. ``decode_groups`` splits a
batch by option set, hands each group to the adapter's batched decode, and isolates failures: a
group whose batched call raises is decoded again one item at a time, so the item that broke it
fails alone and the others still get their text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from workers.engine import DecodeItem, EngineResult, OnSegment, Outcome

Transcribe = Callable[[np.ndarray, dict[str, Any], OnSegment], EngineResult]
DecodeGroup = Callable[[Sequence[DecodeItem]], list[Outcome]]


def batch_ready(held: int, oldest: float, now: float, max_batch: int, wait_s: float) -> bool:
    """Whether a worker holding ``held`` one-shot jobs, the oldest arrived at ``oldest``, decodes them now: once
    it holds ``max_batch`` of them, or once the oldest has waited ``wait_s`` for company (at once with
    ``max_batch`` 1)."""
    return held >= max_batch or now - oldest >= wait_s


def option_key(options: Mapping[str, Any]) -> str:
    """Items with equal keys decode with the same settings, so they may share one model call."""
    return json.dumps(dict(options), sort_keys=True, default=repr)


def by_options(item: DecodeItem) -> str:
    return option_key(item.options)


def groups(items: Sequence[DecodeItem], key: Callable[[DecodeItem], Hashable] = by_options) -> list[list[int]]:
    """The items' indices split by ``key`` (by default their option set), each group in arrival order, groups in
    order of their first item."""
    by_key: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        by_key.setdefault(key(item), []).append(index)
    return list(by_key.values())


def one_by_one(transcribe: Transcribe, items: Sequence[DecodeItem]) -> list[Outcome]:
    """Each item decoded alone; a failure is that item's outcome."""
    outcomes: list[Outcome] = []
    for item in items:
        try:
            outcomes.append(transcribe(item.pcm, item.options, item.on_segment))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def decode_groups(items: Sequence[DecodeItem], decode_group: DecodeGroup, transcribe: Transcribe) -> list[Outcome]:
    """Every item's outcome: each option group through ``decode_group`` (one forward pass where the adapter
    can), and a group whose batched call raised again one by one through ``transcribe``."""
    outcomes: list[Outcome | None] = [None] * len(items)
    for indices in groups(items):
        group = [items[i] for i in indices]
        try:
            results = decode_group(group)
        except Exception as exc:
            results = one_by_one(transcribe, group) if len(group) > 1 else [exc]
        for index, outcome in zip(indices, results, strict=True):
            outcomes[index] = outcome
    done = [outcome for outcome in outcomes if outcome is not None]
    assert len(done) == len(items), "a batch item without an outcome"
    return done
