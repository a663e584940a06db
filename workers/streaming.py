"""Streaming over a growing window with the local-agreement rule, independent of any model.

Each step decodes the audio window (with the confirmed text as prompt) into timed words.
A word becomes final once two consecutive decodes agree on it (LocalAgreement-2, as in
whisper_streaming); final words are never revised. Once the window grows past
``window_seconds``, audio up to the end of the last final word is cut off, so a step's
cost stays bounded however long the stream runs.

``WindowStreamer`` only needs ``decode(pcm, prompt) -> list[Word]`` with times relative
to the start of ``pcm``, so it serves any adapter (whisper, FunASR without an online
model, echo) and is tested with a scripted decoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hub.protocol import SAMPLE_RATE
from hub.results import Segment, Word

Decode = Callable[[np.ndarray, str], list[Word]]
PROMPT_CHARS = 200
MAX_OVERLAP = 5
TOLERANCE = 0.1  # seconds


@dataclass(frozen=True)
class StreamUpdate:
    """What one step produced: words that just became final (as one segment) and the text still in flux."""

    final: Segment | None
    partial: str


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def _segment(words: list[Word]) -> Segment:
    return Segment(
        start=round(words[0].start, 3),
        end=round(words[-1].end, 3),
        text="".join(w.word for w in words).strip(),
        words=tuple(words),
    )


@dataclass
class WindowStreamer:
    decode: Decode
    step_seconds: float = 1.0
    window_seconds: float = 15.0
    _window: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    _offset: float = 0.0  # stream time of the window's first sample
    _fresh: int = 0  # samples fed since the last step
    _committed: list[Word] = field(default_factory=list)
    _previous: list[Word] = field(default_factory=list)  # the last decode's words beyond the committed ones

    @property
    def seconds(self) -> float:
        """Stream time fed so far."""
        return self._offset + self._window.size / SAMPLE_RATE

    @property
    def due(self) -> bool:
        return self._fresh >= self.step_seconds * SAMPLE_RATE

    @property
    def needs_from(self) -> int:
        """The first stream sample a decoder taking over would need: where the window begins."""
        return round(self._offset * SAMPLE_RATE)

    def resume(self, start: int, finals: Sequence[Segment]) -> None:
        """Take over a stream at sample ``start`` from a decoder that confirmed ``finals``: their words
        are the prompt and are not committed again; the audio from ``start`` on is fed as usual."""
        self._offset = start / SAMPLE_RATE
        self._committed = [w for segment in finals for w in segment.words]

    def feed(self, pcm: np.ndarray) -> None:
        self._window = np.concatenate([self._window, pcm])
        self._fresh += pcm.size

    def step(self) -> StreamUpdate:
        """Decode the window; commit the words this decode and the previous one agree on."""
        self._fresh = 0
        current = self._hypothesis()
        agreed = 0
        for old, new in zip(self._previous, current):
            if _norm(old.word) != _norm(new.word):
                break
            agreed += 1
        final = self._commit(current[:agreed])
        self._previous = current[agreed:]
        self._trim()
        return StreamUpdate(final=final, partial="".join(w.word for w in self._previous).strip())

    def finish(self) -> StreamUpdate:
        """The stream ended: decode what is left once more and commit all of it."""
        final = self._commit(self._hypothesis()) if self._window.size else None
        self._previous = []
        return StreamUpdate(final=final, partial="")

    def _hypothesis(self) -> list[Word]:
        # the prompt is the confirmed text whose audio has left the window: text still in the window is
        # decoded again, and a model given it as a prompt tends to skip its audio
        before = [w for w in self._committed if w.end <= self._offset + TOLERANCE]
        prompt = "".join(w.word for w in before)[-PROMPT_CHARS:].strip()
        words = [
            Word(round(float(w.start) + self._offset, 3), round(float(w.end) + self._offset, 3), w.word, float(w.probability))
            for w in self.decode(self._window, prompt)
        ]
        last = self._committed[-1].end if self._committed else 0.0
        # timestamps drift between decodes: keep what starts after the committed end, give or take TOLERANCE,
        # then drop words that only repeat the committed tail
        fresh = [w for w in words if w.start >= last - TOLERANCE and _norm(w.word)]
        return fresh[self._repeated(fresh):]

    def _repeated(self, words: list[Word]) -> int:
        """How many leading words repeat the end of the committed text."""
        tail = [_norm(w.word) for w in self._committed[-MAX_OVERLAP:]]
        head = [_norm(w.word) for w in words[:MAX_OVERLAP]]
        for n in range(min(len(tail), len(head)), 0, -1):
            if tail[-n:] == head[:n]:
                return n
        return 0

    def _commit(self, words: list[Word]) -> Segment | None:
        if not words:
            return None
        self._committed.extend(words)
        return _segment(words)

    def _trim(self) -> None:
        """Past ``window_seconds``, drop the audio before the last committed sentence end (or word), never
        cutting into the first word still pending."""
        if self._window.size / SAMPLE_RATE <= self.window_seconds or not self._committed:
            return
        ends = [w for w in self._committed if w.end > self._offset]
        sentence = [w for w in ends if w.word.rstrip().endswith((".", "?", "!"))]
        cut_at = (sentence or ends or [self._committed[-1]])[-1].end
        if self._previous:
            cut_at = min(cut_at, self._previous[0].start)
        cut = int((cut_at - self._offset) * SAMPLE_RATE)
        if cut <= 0:
            return
        self._window = self._window[cut:]
        self._offset += cut / SAMPLE_RATE
