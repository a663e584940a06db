"""FunASR adapter: one ``AutoModel`` (Paraformer, SenseVoiceSmall, ...) per worker process.

Offline first: ``model:`` is a local model directory (``config.yaml``, ``model.pt``, tokens,
optional ``am.mvn`` / ``bpe.model``). Anything else is a model-hub name, which is refused
before FunASR is even imported unless the provider says ``allow_download: true``: without
a network FunASR's own download retries take over 20 s to fail, and the pool would sit in
``starting`` all that time instead of reporting the reason at once.

Live sessions take one of two paths. A streaming (online) model decodes chunk by chunk
through its own cache (``OnlineStreamer``), as FunASR's own servers drive it; any other
model is re-decoded over a growing window with the local-agreement rule (``WindowStreamer``),
as whisper is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hub.errors import BadRequest
from hub.protocol import SAMPLE_RATE, WorkerSpec
from hub.provider_types import FUNASR
from hub.results import Segment, Word, join_text
from workers.batch import decode_groups, one_by_one
from workers.cuda import warn_cpu_fallback
from workers.engine import DecodeItem, EngineResult, OnSegment, Outcome, Streamer, StreamSettings, window_streamer
from workers.streaming import SpeechEvent, StreamUpdate

CONFIG_FILES = ("config.yaml", "configuration.json")  # what FunASR reads to know the model's class
_TAG_RE = re.compile(r"<\|([^|]*)\|>")  # SenseVoice's rich tags: <|en|><|NEUTRAL|><|Speech|><|woitn|>
_LANGUAGE_TAGS = frozenset({"zh", "en", "yue", "ja", "ko"})
_PRECISIONS = {"auto": {}, "float32": {}, "float16": {"fp16": True}, "bfloat16": {"bf16": True}}
# FunASR's streaming ASR class (paraformer-zh-streaming and the *-online Paraformers), subclasses included
ONLINE_MODEL = "ParaformerStreaming"
# its chunking, the options of the type that have a default; the provider's or a request's options may override them
ONLINE_DEFAULTS: dict[str, Any] = {
    name: rule.default for name, rule in FUNASR.options.items() if rule.default is not None
}
PARAFORMER_OPTIONS = frozenset({"hotword"})
BASE_OPTIONS = frozenset(FUNASR.options) - PARAFORMER_OPTIONS - ONLINE_DEFAULTS.keys()  # what every FunASR model takes
CHUNK_UNIT = 960  # samples per unit of chunk_size (60 ms: one frame after FunASR's 6x frame stacking)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and ideographs: one unit a character
_UNIT_RE = re.compile(f"\\s*(?:[{_CJK}]|[^\\s{_CJK}]+)")


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
    if device == "auto" and not has_gpu:
        warn_cpu_fallback("torch")
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


def to_words(result: dict[str, Any], duration: float) -> list[Word]:
    """A FunASR result as timed words for the window rule, times relative to the decoded audio.

    Each unit is a CJK character or a run of other non-space characters, with the spaces
    before it, so the words join back into the text. Units get the model's timestamps
    (milliseconds) where it gives one per unit (Paraformers asked for them, BiCif/SeACo
    always); otherwise they are spread evenly over ``duration``, and only their order and
    text mean anything.
    """
    units = _UNIT_RE.findall(clean_text(str(result.get("text", "")))[0])
    stamps = result.get("timestamp") or []
    if len(stamps) == len(units):
        spans = [(start / 1000, end / 1000) for start, end in stamps]
    else:
        each = duration / max(len(units), 1)
        spans = [(i * each, (i + 1) * each) for i in range(len(units))]
    return [Word(round(start, 3), round(end, 3), unit, 1.0) for unit, (start, end) in zip(units, spans, strict=False)]


def is_online(model: Any) -> bool:
    """Whether FunASR decodes ``model`` chunk by chunk through a cache (its class or a parent is ``ONLINE_MODEL``)."""
    return any(cls.__name__ == ONLINE_MODEL for cls in type(model).__mro__)


def online_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the online chunking filled in, refused with the reason if ``chunk_size`` is malformed
    (FunASR would fail deep inside the encoder instead)."""
    merged = {**ONLINE_DEFAULTS, **options}
    size = merged["chunk_size"]
    if not (
        isinstance(size, list) and len(size) == 3 and all(isinstance(n, int) and n >= 0 for n in size) and size[1] > 0
    ):
        raise BadRequest(
            f"chunk_size must be three whole numbers [left, chunk, look-ahead] with chunk > 0, got {size!r}"
        )
    return merged


@dataclass
class OnlineStreamer:
    """A live session on a streaming model: FunASR's own chunked decoding, its state carried in ``cache``.

    Audio is decoded in whole chunks of ``chunk_size[1]`` x 60 ms (600 ms by default) as soon as
    one is complete, so ``step_ms`` does not apply: the chunk is the model's step. The model never
    revises what a chunk produced, so each chunk's text is final at once and there is never a
    partial (the session still acknowledges every step with an empty one). ``finish`` runs what
    is left with ``is_final=True``, which flushes the look-ahead and the predictor's tail.
    """

    generate: Callable[..., list[dict[str, Any]]]
    options: dict[str, Any]
    _pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    _decoded: int = 0  # samples already through the model
    _cache: dict[str, Any] = field(default_factory=dict)
    decodes: int = 0

    @property
    def chunk(self) -> int:
        return int(self.options["chunk_size"][1]) * CHUNK_UNIT

    @property
    def seconds(self) -> float:
        return (self._decoded + self._pending.size) / SAMPLE_RATE

    @property
    def due(self) -> bool:
        return self._pending.size >= self.chunk

    @property
    def active(self) -> bool:
        return True

    @property
    def urgent(self) -> bool:
        return False

    @property
    def needs_from(self) -> int:
        """Every decoded chunk is final at once: a decoder taking over needs the audio not decoded yet."""
        return self._decoded

    def pace(self, step_seconds: float) -> None:
        """The chunk is the model's step: its cache is built for that size, so a step is never stretched."""

    def events(self) -> list[SpeechEvent]:
        """No VAD on a streaming model: it decodes every chunk through its cache, silence included."""
        return []

    def resume(self, start: int, finals: Sequence[Segment]) -> None:
        """Take over at sample ``start`` with a fresh cache (the dead worker's went with it)."""
        self._decoded = start

    def feed(self, pcm: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, pcm])

    def step(self) -> StreamUpdate:
        return self._decode(self._pending.size // self.chunk * self.chunk, is_final=False)

    def finish(self) -> StreamUpdate:
        if not self.seconds:  # no audio came: the model would decode its zeroed cache into noise
            return StreamUpdate(final=None, partial="")
        return self._decode(self._pending.size, is_final=True)

    def _decode(self, samples: int, is_final: bool) -> StreamUpdate:
        """Run ``samples`` of pending audio through the model; their text is one segment spanning them."""
        pcm, self._pending = self._pending[:samples], self._pending[samples:]
        self.decodes += 1
        start, self._decoded = self._decoded, self._decoded + samples
        results = self.generate(input=pcm, cache=self._cache, is_final=is_final, **self.options)
        text = "".join(str(r.get("text", "")) for r in results).strip()
        final = Segment(round(start / SAMPLE_RATE, 3), round(self._decoded / SAMPLE_RATE, 3), text) if text else None
        return StreamUpdate(final=final, partial="")


class FunASREngine:
    """A FunASR model loaded from a local directory.

    Request options (the provider's defaults already merged in by the worker) go to
    ``AutoModel.generate`` as they are; ``hotword`` only where the model is a Paraformer,
    the family that biases decoding with it, so other models refuse it instead of ignoring it.
    A streaming (online) model also takes its chunking (``ONLINE_DEFAULTS``), and is always run
    to the end of the audio (``is_final``), one-shot or live.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        source = resolve_model(spec)
        AutoModel = _import_automodel()
        try:
            self._model = AutoModel(**automodel_kwargs(spec, source))
        except Exception as exc:
            raise RuntimeError(f"cannot load funasr model {spec.model!r} (from {source}): {exc}") from exc
        paraformer = "Paraformer" in str(self._model.kwargs.get("model", ""))
        self.online = is_online(self._model.model)
        self.options = BASE_OPTIONS.union(
            PARAFORMER_OPTIONS if paraformer else (), ONLINE_DEFAULTS if self.online else ()
        )
        # Paraformers compute their CIF token timestamps when asked; the window rule wants them
        self._timestamps = {"output_timestamp": True} if paraformer else {}
        self.device = self._device_name()

    def _device_name(self) -> str:
        """Where the weights really are: ``cpu`` or ``cuda`` (which card: the supervisor's status)."""
        return str(next(self._model.model.parameters()).device.type)

    def transcribe(self, pcm: np.ndarray, options: dict[str, Any], on_segment: OnSegment) -> EngineResult:
        # an online model given no cache and no is_final keeps the last partial chunk back, waiting for more
        run = {**online_options(options), "cache": {}, "is_final": True} if self.online else options
        return self._answer(DecodeItem(pcm, options, on_segment), self._model.generate(input=pcm, **run))

    def transcribe_batch(self, items: Sequence[DecodeItem]) -> list[Outcome]:
        """Jobs with the same options in one ``generate`` over the list of their audio, ``batch_size`` of them
        at once (FunASR pads them into one forward pass); a streaming model, whose decode runs through one
        cache, decodes each alone."""
        return decode_groups(items, self._decode_group, self.transcribe)

    def _decode_group(self, items: Sequence[DecodeItem]) -> list[Outcome]:
        if self.online or len(items) == 1:
            return one_by_one(self.transcribe, items)
        results = self._model.generate(input=[item.pcm for item in items], batch_size=len(items), **items[0].options)
        if len(results) != len(items):
            raise RuntimeError(f"funasr answered {len(results)} results for a batch of {len(items)}")
        return [self._answer(item, [result]) for item, result in zip(items, results, strict=False)]

    def _answer(self, item: DecodeItem, results: list[dict[str, Any]]) -> EngineResult:
        """FunASR's results for one item's audio as the item's answer, its segments streamed."""
        duration = item.pcm.size / SAMPLE_RATE
        segments, detected = [], None
        for result in results:
            text, language = clean_text(str(result.get("text", "")))
            detected = detected or language
            segment = to_segment(result, text, duration)
            segments.append(segment)
            item.on_segment(segment)
        return EngineResult(
            text=join_text(s.text for s in segments),
            segments=tuple(segments),
            language=detected or self.stream_language(item.options),
            duration=duration,
        )

    def stream_language(self, options: dict[str, Any]) -> str | None:
        """A live session's language: the one asked for (``auto`` is detected per decode, not reported)."""
        asked = options.get("language")
        return asked if asked != "auto" else None

    def open_stream(self, options: dict[str, Any], settings: StreamSettings) -> Streamer:
        """The model's own chunked decoding where it is a streaming model, else the window rule.

        On the window path the prompt goes unused (FunASR models take none), and where the model
        gives no timestamps ``to_words`` spreads the words evenly over the window: agreement then
        works on the text alone, and the times on the words, the trimming of a window longer than
        ``window_seconds`` among them, are estimates.
        """
        if self.online:
            return OnlineStreamer(self._model.generate, online_options(options))
        run = {**options, **self._timestamps}

        def decode(pcm: np.ndarray, prompt: str) -> list[Word]:
            duration = pcm.size / SAMPLE_RATE
            return [w for result in self._model.generate(input=pcm, **run) for w in to_words(result, duration)]

        return window_streamer(decode, settings)
