"""The cost of a live-session step on tiny.en, before and after "one decode per step" (issue 27, item 2), and with
the encoder's input padded to the window instead of 30 s.

Before: the worker's old step, ``WhisperModel.transcribe(window, word_timestamps=True)``, which decodes a second
time when the window ends inside a segment and retries at higher temperatures after a poor decode. After:
``workers.whisper_step.WindowDecoder``, one encode, one generate and one alignment, its audio padded to
``stream.window_seconds`` (15 s by default) as a VAD-gated session's step is; "padded": the same decoder padding
to Whisper's 30 s, as it was first built and as a session without VAD still has it. Three ``WindowStreamer``
sessions, one per decoder, are fed the committed clips (46 s) a step at a time in lockstep in one process with a
worker's settings (1 thread, int8), so all see the same windows and the same machine noise; every step's time and
its calls into CTranslate2 (encodes and generates) are counted, and the final texts are compared with what the
clips say and with each other.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from bench.batching import one_thread
from bench.live_turns import continuous_audio
from bench.settings import MODEL, compute_type
from hub.wer import word_error_rate


class _Counted:
    """A CTranslate2 Whisper model whose ``encode`` and ``generate`` calls are counted."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.calls = {"encode": 0, "generate": 0}

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._model, name)
        if name not in self.calls:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


def measure(step_s: float = 1.0, device: str = "cpu") -> dict[str, Any]:
    one_thread()
    from faster_whisper import WhisperModel

    from hub.results import Word
    from workers.engine import StreamSettings
    from workers.streaming import WindowStreamer
    from workers.whisper import resolve_model
    from workers.whisper_step import WindowDecoder

    model = WhisperModel(resolve_model(MODEL), device=device, compute_type=compute_type(device), cpu_threads=1)
    counted = _Counted(model.model)
    model.model = counted

    def before(pcm: np.ndarray, prompt: str) -> list[Word]:  # the worker's step until issue 27
        segments, _ = model.transcribe(
            pcm, word_timestamps=True, initial_prompt=prompt or None, condition_on_previous_text=False
        )
        return [Word(w.start, w.end, w.word, w.probability) for s in segments for w in s.words or ()]

    window = StreamSettings().window_seconds
    streams = {
        "before": WindowStreamer(before, step_s),
        "padded": WindowStreamer(WindowDecoder(model, {}, 30.0), step_s),
        "after": WindowStreamer(WindowDecoder(model, {}, window), step_s),
    }
    figures: dict[str, dict[str, list[float]]] = {
        name: {"seconds": [], "encode": [], "generate": []} for name in streams
    }
    texts: dict[str, list[str]] = {name: [] for name in streams}
    pcm, said = continuous_audio()
    step = int(step_s * 16000)
    for offset in range(0, pcm.size, step):
        for name, stream in streams.items():
            stream.feed(pcm[offset : offset + step])
            before_calls = dict(counted.calls)
            started = time.perf_counter()
            update = stream.step() if offset + step < pcm.size else stream.finish()
            figures[name]["seconds"].append(time.perf_counter() - started)
            for call in ("encode", "generate"):
                figures[name][call].append(counted.calls[call] - before_calls[call])
            if update.final is not None:
                texts[name].append(update.final.text)
    rows = {
        name: {
            "steps": len(f["seconds"]),
            "mean_s": round(statistics.mean(f["seconds"]), 3),
            "p50_s": round(statistics.median(f["seconds"]), 3),
            "max_s": round(max(f["seconds"]), 3),
            "encodes_per_step": round(statistics.mean(f["encode"]), 2),
            "generates_per_step": round(statistics.mean(f["generate"]), 2),
            "text": " ".join(texts[name]),
            "wer": round(word_error_rate(said, " ".join(texts[name])), 4),
        }
        for name, f in figures.items()
    }
    return {
        "audio_s": round(pcm.size / 16000, 1),
        "step_s": step_s,
        "device": device,
        **rows,
        "window_s": window,
        "ratio": round(rows["before"]["mean_s"] / rows["after"]["mean_s"], 2),
        "ratio_padded": round(rows["padded"]["mean_s"] / rows["after"]["mean_s"], 2),
        "wer_after_vs_before": round(word_error_rate(rows["before"]["text"], rows["after"]["text"]), 4),
        "wer_after_vs_padded": round(word_error_rate(rows["padded"]["text"], rows["after"]["text"]), 4),
    }


def summary(f: dict[str, Any]) -> str:
    lines = [
        f"\nlive-session steps over {f['audio_s']:g} s of clips, a step every {f['step_s']:g} s, tiny.en, 1 thread:",
        "  decode                      steps  mean s  p50 s  max s  encodes/step  generates/step    WER",
    ]
    labels = (
        ("before", "transcribe(word_timestamps)"),
        ("padded", "one decode, padded to 30 s"),
        ("after", f"one decode, padded to {f['window_s']:g} s"),
    )
    for name, label in labels:
        r = f[name]
        lines.append(
            f"  {label:<27} {r['steps']:>5}  {r['mean_s']:>6.3f} {r['p50_s']:>6.3f} {r['max_s']:>6.3f}"
            f"  {r['encodes_per_step']:>12.2f}  {r['generates_per_step']:>14.2f}  {r['wer']:>5.1%}"
        )
    lines.append(
        f"  before/after: {f['ratio']:.2f}x mean step cost; WER of the texts after vs before: {f['wer_after_vs_before']:.1%}"
    )
    lines.append(
        f"  padded/after: {f['ratio_padded']:.2f}x mean step cost; WER after vs padded: {f['wer_after_vs_padded']:.1%}"
    )
    return "\n".join(lines)
