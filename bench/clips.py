"""The benchmark's audio: ~10 s clips joined from the committed test clips with short silences.

Whisper pads every call to a 30 s window, so a call costs about the same for 1 s as for
10 s of speech; ~10 s clips (as in the DESIGN's peer figures) keep the comparison about
real requests rather than that fixed cost. The clips differ in length on purpose: a fair
ceiling must hand out work from a shared queue, not in fixed halves.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
SOURCES = ("hello", "coffee", "stella", "weather")
GAP_S = 0.5


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit mono 16 kHz wav as float32 (the committed clips are all that)."""
    with wave.open(str(path)) as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise ValueError(f"{path}: expected 16-bit mono {SAMPLE_RATE} Hz")
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def _orders() -> list[list[str]]:
    """The sources of each clip, in order: the clip ``skip`` leaves source ``skip`` out."""
    return [[SOURCES[(skip + k) % len(SOURCES)] for k in range(1, len(SOURCES))] for skip in range(len(SOURCES))]


def build_clips() -> list[np.ndarray]:
    """Four clips, each three of the four sources in a rotated order: 9.8 to 13.2 s."""
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)
    clips = []
    for names in _orders():
        joined = [p for name in names for p in (read_wav(DATA / f"{name}.wav"), gap)][:-1]
        clips.append(np.concatenate(joined))
    return clips


def clip_texts() -> list[str]:
    """What each of ``build_clips()`` says: its sources' committed reference texts, in order."""
    return [" ".join((DATA / f"{name}.txt").read_text().strip() for name in names) for names in _orders()]


def of_length(seconds: float, clips: list[np.ndarray]) -> np.ndarray:
    """``seconds`` of audio made by repeating the clips (for the transport tests, where content is moot)."""
    return np.resize(np.concatenate(clips), int(seconds * SAMPLE_RATE)).astype(np.float32)


def duration(pcm: np.ndarray) -> float:
    return pcm.size / SAMPLE_RATE
