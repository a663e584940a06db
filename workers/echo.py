"""The ``echo`` provider: no model, for tests and for measuring the hub's own overhead.

It answers a deterministic text computed from the audio (its duration and RMS), so a
test can tell which audio a worker saw. Request options make it misbehave on purpose:
``sleep=<s>`` sleeps first, ``fail="<msg>"`` raises and ``exit=<code>`` ends the worker process
(both from the worker's ``fail_from``-th decode on, the start's health decode being the first;
as provider options, ``fail_from: 2`` lets the worker get ready), ``fail_every=<n>`` raises on every n-th
job of the worker after that start decode (health checks count; a canary with an error rate),
``hang=True`` never answers. A batch (``transcribe_batch``) is one pass over all its jobs, each with its
own faults, so tests can drive batching: one job's ``fail`` fails it alone, one job's ``exit`` kills the
whole batch's worker. It must never stand in
for proving that transcription works: that is what the whisper tests are for. With
``device: cuda`` it goes through GPU placement like a model worker and says it runs on ``cuda``
(it holds no GPU memory): that is how tests drive placement with real processes on a machine without GPUs.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from hub.protocol import SAMPLE_RATE, WorkerSpec
from hub.provider_types import ECHO
from hub.results import Segment, Word
from workers.engine import DecodeItem, EngineResult, OnSegment, Outcome, StreamSettings
from workers.streaming import Window, WindowStreamer

WORD_SECONDS = 0.5


def echo_words(pcm: np.ndarray) -> list[Word]:
    """A live session's "words": one per whole half second, named by its RMS, so agreement is deterministic."""
    step = int(WORD_SECONDS * SAMPLE_RATE)
    return [
        Word(i * WORD_SECONDS, (i + 1) * WORD_SECONDS, f" a{round(_rms(pcm[i * step : (i + 1) * step]) * 1000)}", 1.0)
        for i in range(pcm.size // step)
    ]


def _rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))


def echo_text(pcm: np.ndarray) -> str:
    """The answer for ``pcm``; tests compute it the same way to check what the worker saw."""
    return f"echo {pcm.size / SAMPLE_RATE:.3f}s rms={_rms(pcm):.4f}"


def _answer(item: DecodeItem, number: int) -> EngineResult:
    """The item's answer, or the failure its options ask for on the worker's ``number``-th decode."""
    options, jobs = item.options, number - 1  # the jobs after the start's health decode
    if "fail" in options and number >= int(options.get("fail_from", 1)):
        raise RuntimeError(str(options["fail"]))
    if "fail_every" in options and jobs and jobs % int(options["fail_every"]) == 0:
        raise RuntimeError(f"job {jobs} of this worker fails (fail_every={options['fail_every']})")
    duration = item.pcm.size / SAMPLE_RATE
    text = echo_text(item.pcm)
    count = max(1, int(options.get("segments", 1)))
    segments = []
    for i in range(count):
        segment = Segment(start=duration * i / count, end=duration * (i + 1) / count, text=f"{text} #{i + 1}")
        segments.append(segment)
        item.on_segment(segment)
    return EngineResult(text=text, segments=tuple(segments), language=options.get("language"), duration=duration)


class EchoEngine:
    options = frozenset(ECHO.options)

    def __init__(self, spec: WorkerSpec) -> None:
        """There is no model to load; only the decodes are counted, for ``fail_from`` and ``fail_every``."""
        self.device = "cuda" if spec.device == "cuda" else "cpu"
        self.decodes = 0
        self._windows: dict[float, EchoWindows] = {}  # a live decoder per ``sleep``

    def transcribe(self, pcm: np.ndarray, options: dict[str, Any], on_segment: OnSegment) -> EngineResult:
        (outcome,) = self.transcribe_batch([DecodeItem(pcm, options, on_segment)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def transcribe_batch(self, items: Sequence[DecodeItem]) -> list[Outcome]:
        """One pass over every item whatever its options (echo's options are faults, not decoding settings):
        an item's ``exit`` ends the worker (a crash mid-batch), its ``hang`` hangs the whole pass, the pass
        sleeps once for the longest ``sleep`` of its items, and an item's ``fail`` fails that item alone."""
        numbers = []  # each item's decode number on this worker, the start's health decode being the first
        for _ in items:
            self.decodes += 1
            numbers.append(self.decodes)
        for item, number in zip(items, numbers, strict=False):
            if "exit" in item.options and number >= int(item.options.get("fail_from", 1)):
                os._exit(int(item.options["exit"]))
        if any(item.options.get("hang") for item in items):
            threading.Event().wait()
        time.sleep(max((float(item.options.get("sleep", 0.0)) for item in items), default=0.0))
        outcomes: list[Outcome] = []
        for item, number in zip(items, numbers, strict=False):
            try:
                outcomes.append(_answer(item, number))
            except RuntimeError as exc:
                outcomes.append(exc)
        return outcomes

    def stream_language(self, options: dict[str, Any]) -> str | None:
        return options.get("language")

    def open_stream(self, options: dict[str, Any], settings: StreamSettings) -> WindowStreamer:
        """The same window and agreement rule as whisper, over ``echo_words``; ``sleep`` slows each decode, and
        sessions with the same ``sleep`` share one decoder, so the worker can step them together."""
        delay = float(options.get("sleep", 0.0))
        decoder = self._windows.setdefault(delay, EchoWindows(delay))
        return WindowStreamer(decoder, settings.step_ms / 1000, settings.window_seconds, batch=decoder.many)


class EchoWindows:
    """Echo's live decode: ``echo_words`` of the window after ``delay`` seconds; ``many`` hears several
    windows in one pass that sleeps once, as one forward pass over a batch would take about one decode's time."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, pcm: np.ndarray, prompt: str) -> list[Word]:
        time.sleep(self.delay)
        return echo_words(pcm)

    def many(self, windows: Sequence[Window]) -> list[list[Word] | Exception]:
        time.sleep(self.delay)
        return [echo_words(pcm) for pcm, _ in windows]
