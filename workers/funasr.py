"""FunASR adapter: one ``AutoModel`` (Paraformer, SenseVoiceSmall, ...) per worker process.

Offline first: ``model:`` is a local model directory (``config.yaml``, ``model.pt``, tokens,
optional ``am.mvn`` / ``bpe.model``). Anything else is a model-hub name, which is refused
before FunASR is even imported unless the provider says ``allow_download: true``: without
a network FunASR's own download retries take over 20 s to fail, and the pool would sit in
``starting`` all that time instead of reporting the reason at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from hub.protocol import SAMPLE_RATE, WorkerSpec
from hub.results import Segment
from workers.engine import EngineResult, OnSegment

CONFIG_FILES = ("config.yaml", "configuration.json")  # what FunASR reads to know the model's class
BASE_OPTIONS = frozenset({"language", "use_itn", "batch_size_s"})
_TAG_RE = re.compile(r"<\|([^|]*)\|>")  # SenseVoice's rich tags: <|en|><|NEUTRAL|><|Speech|><|woitn|>
_LANGUAGE_TAGS = frozenset({"zh", "en", "yue", "ja", "ko"})
_PRECISIONS = {"auto": {}, "float32": {}, "float16": {"fp16": True}, "bfloat16": {"bf16": True}}


def resolve_model(spec: WorkerSpec) -> str:
    """The directory (or, with ``allow_download``, the hub name) to give ``AutoModel``.

    Raises at once with the fix in the message, so a misconfigured provider degrades in
    well under a second rather than after FunASR's download retries.
    """
    path = Path(spec.model).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in CONFIG_FILES):
            raise RuntimeError(
                f"funasr model directory {str(path)!r} has no config.yaml: a FunASR model directory holds "
                "config.yaml, model.pt and its tokens (tokens.json or tokens.txt)"
            )
        return str(path)
    if not spec.allow_download:
        raise RuntimeError(
            f"funasr model {spec.model!r} is not a local directory and downloads are off: point "
            f"providers.{spec.provider}.model at a downloaded model directory, or set "
            f"providers.{spec.provider}.allow_download: true to let FunASR fetch it from its model hub"
        )
    return spec.model


def resolve_device(device: str) -> str:
    """``auto`` is CUDA where this process sees a GPU (``CUDA_VISIBLE_DEVICES`` decides), else the CPU.

    FunASR quietly falls back to the CPU when CUDA is asked for and absent; an explicit
    ``cuda`` with no GPU visible is refused instead, so a mispinned worker is not silently slow.
    """
    import torch

    has_gpu = torch.cuda.is_available()
    if device == "cpu" or (device == "auto" and not has_gpu):
        return "cpu"
    if not has_gpu:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        raise RuntimeError(f"device: cuda, but torch sees no GPU (CUDA_VISIBLE_DEVICES={visible!r})")
    return "cuda:0"  # the one GPU this worker was pinned to is index 0 inside it


def precision(compute_type: str) -> dict[str, bool]:
    """FunASR's precision switches for ``compute_type``; ``auto`` keeps the weights' float32."""
    if compute_type not in _PRECISIONS:
        raise RuntimeError(
            f"compute_type {compute_type!r} is not supported by funasr providers (use {', '.join(_PRECISIONS)})"
        )
    return _PRECISIONS[compute_type]


def automodel_kwargs(spec: WorkerSpec, source: str) -> dict[str, Any]:
    """``AutoModel``'s arguments for this worker: its device, precision and threads, no network."""
    kwargs: dict[str, Any] = {
        "model": source,
        "device": resolve_device(spec.device),
        "disable_update": True,  # no version check against the network at every start
        "disable_pbar": True,
        **precision(spec.compute_type),
    }
    if spec.cpu_threads:  # 0 leaves FunASR its own default
        kwargs["ncpu"] = spec.cpu_threads
    return kwargs


def _import_automodel() -> Any:
    try:
        from funasr import AutoModel
    except ImportError as exc:
        raise RuntimeError(
            f"FunASR is not installed ({exc}): `make install EXTRAS=funasr`, or install a torch build for "
            "this machine first and then `pip install 'asr-hub[funasr]'`"
        ) from exc
    return AutoModel


def clean_text(text: str) -> tuple[str, str | None]:
    """Strip SenseVoice's rich tags from ``text``; return it with the language tag, if any."""
    language = next((tag for tag in _TAG_RE.findall(text) if tag in _LANGUAGE_TAGS), None)
    return _TAG_RE.sub("", text).strip(), language


def to_segment(result: dict[str, Any], text: str, duration: float) -> Segment:
    """One segment per FunASR result: spanning its token timestamps (milliseconds) where the model
    gives them (BiCif/SeACo Paraformer), else the whole audio."""
    stamps = result.get("timestamp") or []
    if stamps:
        return Segment(start=round(stamps[0][0] / 1000, 3), end=round(stamps[-1][1] / 1000, 3), text=text)
    return Segment(start=0.0, end=round(duration, 3), text=text)


class FunASREngine:
    """A FunASR model loaded from a local directory.

    Request options (the provider's defaults already merged in by the worker) go to
    ``AutoModel.generate`` as they are; ``hotword`` only where the model is a Paraformer,
    the family that biases decoding with it, so other models refuse it instead of ignoring it.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        source = resolve_model(spec)
        AutoModel = _import_automodel()
        try:
            self._model = AutoModel(**automodel_kwargs(spec, source))
        except Exception as exc:
            raise RuntimeError(f"cannot load funasr model {spec.model!r} (from {source}): {exc}") from exc
        model_class = str(self._model.kwargs.get("model", ""))
        self.options = BASE_OPTIONS | ({"hotword"} if "Paraformer" in model_class else set())
        self.device = self._device_name()

    def _device_name(self) -> str:
        """Where the weights really are: ``cpu``, or ``cuda:<the GPU index the supervisor pinned>``."""
        kind = next(self._model.model.parameters()).device.type
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return f"cuda:{gpu}" if kind == "cuda" and gpu else kind

    def transcribe(self, pcm: np.ndarray, options: dict[str, Any], on_segment: OnSegment) -> EngineResult:
        duration = pcm.size / SAMPLE_RATE
        segments, detected = [], None
        for result in self._model.generate(input=pcm, **options):
            text, language = clean_text(str(result.get("text", "")))
            detected = detected or language
            segment = to_segment(result, text, duration)
            segments.append(segment)
            on_segment(segment)
        asked = options.get("language")
        return EngineResult(
            text=" ".join(s.text for s in segments if s.text),
            segments=tuple(segments),
            language=detected or (asked if asked != "auto" else None),
            duration=duration,
        )
