"""The small interface every model adapter implements, and how a worker picks its adapter.

``load_engine`` imports the adapter that ``hub.provider_types`` names for the provider's type, and
adapters import their model library when they load, so importing ``workers`` costs nothing and a
worker only pays for the library it uses. This module names no adapter: adapters import it, not the
other way round.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from hub.errors import BadRequest
from hub.protocol import WorkerSpec
from hub.provider_types import PROVIDER_TYPES
from hub.results import Segment
from workers.streaming import Decode, DecodeMany, SpeechEvent, StreamUpdate, WindowStreamer
from workers.vad import SpeechDetector

OnSegment = Callable[[Segment], None]


def no_segments(segment: Segment) -> None:
    """An ``OnSegment`` for a decode whose segments nobody streams."""


@dataclass(frozen=True)
class EngineResult:
    text: str
    segments: tuple[Segment, ...]
    language: str | None
    duration: float


@dataclass(frozen=True, eq=False)
class DecodeItem:
    """One decode of a batch: its own float32 mono 16 kHz audio and its own (checked) options.

    A one-shot request, a piece of a long recording and a live session's step are all decode items,
    so any of them can share a forward pass with the others (``Engine.transcribe_batch``)."""

    pcm: np.ndarray
    options: dict[str, Any]
    on_segment: OnSegment = no_segments
    # a piece of a long recording, cut at a pause: whisper decodes its window in one pass and keeps the text
    # after the last timestamp as a last segment, instead of decoding that tail again (``workers.whisper_batch``)
    piece: bool = False


Outcome = EngineResult | Exception  # one item's result, or what failed it (that item alone)


class Streamer(Protocol):
    """A live session's decoder: fed chunks, stepped when ``due``, finished once (``WindowStreamer`` is one)."""

    @property
    def due(self) -> bool: ...

    @property
    def seconds(self) -> float: ...

    decodes: int  # decodes made so far (the session's answer reports it)

    @property
    def active(self) -> bool:
        """It decodes as audio comes (with VAD: while someone speaks): its decodes count in the worker's load."""
        ...

    @property
    def urgent(self) -> bool:
        """Its listener waits for a final now (an utterance has ended): its turn comes first."""
        ...

    @property
    def needs_from(self) -> int:
        """The first stream sample a decoder taking over from this one would need."""
        ...

    def pace(self, step_seconds: float) -> None:
        """Decode after ``step_seconds`` of new audio from now on (the worker stretches steps when overloaded)."""
        ...

    def events(self) -> list[SpeechEvent]:
        """Speech boundaries heard since the last call (VAD only)."""
        ...

    def resume(self, start: int, finals: Sequence[Segment]) -> None:
        """Continue a stream from sample ``start``, after the final segments another decoder confirmed."""
        ...

    def feed(self, pcm: np.ndarray) -> None: ...

    def step(self) -> StreamUpdate: ...

    def finish(self) -> StreamUpdate: ...


class Engine(Protocol):
    """A loaded model. ``options`` names the request options it accepts."""

    options: frozenset[str]
    device: str

    def transcribe(self, pcm: np.ndarray, options: dict[str, Any], on_segment: OnSegment) -> EngineResult:
        """Transcribe float32 mono 16 kHz PCM, calling ``on_segment`` for each segment as it is decoded."""
        ...

    def transcribe_batch(self, items: Sequence[DecodeItem]) -> list[Outcome]:
        """Decode ``items`` together where their options allow (``workers.batch``): one outcome per item,
        in order; an item's failure is its own outcome and fails no other item."""
        ...

    def open_stream(self, options: dict[str, Any], settings: StreamSettings) -> Streamer:
        """A decoder for one live session."""
        ...

    def stream_language(self, options: dict[str, Any]) -> str | None:
        """The language a live session with these options is in, where it is known without decoding."""
        ...


@dataclass(frozen=True)
class StreamSettings:
    """The provider's ``stream:`` section, as the worker receives it."""

    step_ms: int = 1000
    window_seconds: float = 15.0
    vad: bool = True
    endpoint_ms: int = 600
    vad_threshold: float = 0.5


def window_streamer(decode: Decode, settings: StreamSettings, batch: DecodeMany | None = None) -> WindowStreamer:
    """The local-agreement streamer over ``decode``, gated by Silero VAD where ``settings.vad``; ``batch`` (if
    any) hears the windows of several sessions in one call."""
    detector = SpeechDetector(settings.vad_threshold, settings.endpoint_ms) if settings.vad else None
    return WindowStreamer(decode, settings.step_ms / 1000, settings.window_seconds, detector, batch)


def check_options(engine: Engine, provider_type: str, options: dict[str, Any]) -> None:
    """A request's options: names this model takes, values of the right kind (else BAD_REQUEST, which,
    unlike a model failure, does not count against the worker)."""
    unknown = sorted(set(options) - engine.options)
    if unknown:
        raise BadRequest(
            f"option(s) {', '.join(unknown)} not supported by {provider_type} providers "
            f"(supported: {', '.join(sorted(engine.options))})"
        )
    problems = PROVIDER_TYPES[provider_type].option_problems(options)
    if problems:
        raise BadRequest("; ".join(problems))


def load_engine(spec: WorkerSpec) -> Engine:
    """Build the adapter named by the provider's type; raises whatever the model library raises."""
    kind = PROVIDER_TYPES.get(spec.type)
    if kind is None:
        raise ValueError(f"no adapter for provider type {spec.type!r}")
    module, _, name = kind.engine.partition(":")
    engine: Engine = getattr(importlib.import_module(module), name)(spec)
    return engine
