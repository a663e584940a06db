"""Voice activity for live sessions: where speech starts and where an utterance ends.

``SileroStream`` runs the Silero VAD that faster-whisper ships (``silero_vad_v6.onnx``) over a session's
audio as it arrives, one 32 ms frame of 512 samples at a time, and keeps the model's recurrent state
and the last frame's context between calls, so every sample is looked at once however the chunks
fall (the probabilities equal one pass over the whole stream). ``SpeechGate`` turns the frames'
speech probabilities into boundaries: speech starts at a frame at or above ``threshold``; the
utterance ends once the probability has stayed below ``threshold - 0.15`` (faster-whisper's
``neg_threshold``) for ``endpoint_ms``, and its end is the end of its last speech frame. The gate is
pure (stream time in, boundaries out), so its rules are tested without the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from hub.protocol import SAMPLE_RATE

FRAME = 512  # samples per Silero frame at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame each frame is given
HYSTERESIS = 0.15  # below threshold - HYSTERESIS is silence (faster_whisper.vad.VadOptions.neg_threshold)


class Boundary(str, Enum):
    STARTED = "speech_started"
    STOPPED = "speech_stopped"


@dataclass(frozen=True)
class SpeechEdge:
    """A boundary at ``at`` seconds into the stream."""

    kind: Boundary
    at: float


@dataclass
class SpeechGate:
    """Speech probabilities per frame in, speech boundaries out (stream seconds). Pure: no model, no clock."""

    threshold: float = 0.5
    endpoint_s: float = 0.6
    frame_s: float = FRAME / SAMPLE_RATE
    speaking: bool = False  # between a STARTED and its STOPPED
    frames: int = 0  # frames seen so far
    last_speech: float = 0.0  # end of the last frame heard as speech

    def push(self, probabilities: Iterable[float]) -> list[SpeechEdge]:
        edges = []
        for p in probabilities:
            start = self.frames * self.frame_s
            self.frames += 1
            end = self.frames * self.frame_s
            if not self.speaking:
                if p >= self.threshold:
                    self.speaking = True
                    self.last_speech = end
                    edges.append(SpeechEdge(Boundary.STARTED, round(start, 3)))
            elif p >= self.threshold - HYSTERESIS:
                self.last_speech = end
            elif end - self.last_speech >= self.endpoint_s - 1e-9:
                self.speaking = False
                edges.append(SpeechEdge(Boundary.STOPPED, round(self.last_speech, 3)))
        return edges


class SileroStream:
    """Silero's speech probability for each 512-sample frame of a stream fed in pieces of any size."""

    def __init__(self, session: Any) -> None:
        self._session = session  # an onnxruntime.InferenceSession of silero_vad_v6.onnx
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)  # fewer than FRAME samples not looked at yet

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        """The probabilities of the whole frames ``pcm`` completes (those it leaves open wait for the next call)."""
        audio = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        whole = audio.size // FRAME * FRAME
        self._pending = audio[whole:]
        if not whole:
            return np.zeros(0, dtype=np.float32)
        frames = audio[:whole].reshape(-1, FRAME)
        contexts = np.concatenate([self._context[None], frames[:-1, -CONTEXT:]])
        self._context = frames[-1, -CONTEXT:].copy()
        probabilities, self._h, self._c = self._session.run(
            None, {"input": np.concatenate([contexts, frames], axis=1), "h": self._h, "c": self._c}
        )
        return np.asarray(probabilities, dtype=np.float32).reshape(-1)


class SpeechDetector:
    """``SileroStream`` and ``SpeechGate`` together: audio in, boundaries out."""

    def __init__(self, threshold: float, endpoint_ms: int) -> None:
        self.probabilities = SileroStream(silero_session())
        self.gate = SpeechGate(threshold=threshold, endpoint_s=endpoint_ms / 1000)

    @property
    def heard(self) -> float:
        return self.gate.frames * self.gate.frame_s

    @property
    def last_speech(self) -> float:
        return self.gate.last_speech

    def feed(self, pcm: np.ndarray) -> list[SpeechEdge]:
        return self.gate.push(self.probabilities(pcm))


def silero_session() -> Any:
    """The ONNX session of faster-whisper's Silero VAD, one per process (its sessions share it; it keeps no state)."""
    try:
        from faster_whisper.vad import get_vad_model
    except ImportError as exc:
        raise RuntimeError(
            f"stream.vad needs faster-whisper's Silero VAD, which this worker cannot import ({exc}): "
            "install faster-whisper beside the model library, or set stream.vad: false"
        ) from exc
    return get_vad_model().session
