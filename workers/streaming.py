"""Streaming over a growing window with the local-agreement rule, independent of any model.

Each step decodes the audio window (with the confirmed text as prompt) into timed words.
A word becomes final once two consecutive decodes agree on it (LocalAgreement-2, as in
whisper_streaming); final words are never revised. Once the window grows past
``window_seconds``, audio up to the end of the last final word is cut off, so a step's
cost stays bounded however long the stream runs.

With a speech detector (``stream.vad``), the window holds only speech: while nobody speaks it
keeps the last ``PREROLL_S`` of audio and nothing is decoded; steps come only during an
utterance (partials only then). Once the speaker has paused for ``PAUSE_S``, one step decodes
all the speech so far (sooner than ``step_ms`` would); if the pause lasts ``stream.endpoint_ms``
(the utterance has ended) that decode already holds every word, so the utterance is confirmed
at once without decoding again (else its end is decoded then). Either way the session says
``utterance`` right after its finals and restarts the window after it. The detector's boundaries (``speech_started``,
``speech_stopped``) are handed out as they are heard (``events``).

``WindowStreamer`` only needs ``decode(pcm, prompt) -> list[Word]`` with times relative
to the start of ``pcm``, so it serves any adapter (whisper, FunASR without an online
model, echo) and is tested with a scripted decoder (and a scripted detector).

A step makes at most one decode. ``stepping`` is the step as a generator that hands out that decode's
window (audio and prompt) and takes its words back, so a worker can step several sessions at once and
hear all their windows in one batched call (``step_together``, with the streamers' shared ``batch``);
``step`` is the same step with the streamer's own ``decode``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np

from hub.protocol import SAMPLE_RATE
from hub.results import Segment, Word
from workers.vad import Boundary, SpeechEdge

Decode = Callable[[np.ndarray, str], list[Word]]
Window = tuple[np.ndarray, str]  # what one decode hears: the audio, and the confirmed text before it as the prompt
DecodeMany = Callable[[Sequence[Window]], list[list[Word] | Exception]]  # several windows in one model call
PROMPT_CHARS = 200
MAX_OVERLAP = 5
TOLERANCE = 0.1  # seconds
PREROLL_S = 0.4  # audio kept before speech starts, so the decode hears its onset
TAIL_S = 0.2  # silence after an utterance's last speech that its final decode hears
PAUSE_S = 0.25  # after this much silence, a step decodes all the speech so far: the final, should it end here


class EventKind(str, Enum):
    """What a session tells its client besides its text, with VAD on (``hub.client.session.StreamEvent.kind``)."""

    SPEECH_STARTED = Boundary.STARTED.value
    SPEECH_STOPPED = Boundary.STOPPED.value
    UTTERANCE = "utterance"  # every final of the utterance ending ``at`` has been sent; ``text`` is all of it


@dataclass(frozen=True)
class SpeechEvent:
    kind: EventKind
    at: float  # seconds into the stream
    text: str = ""


@dataclass(frozen=True)
class StreamUpdate:
    """What one step produced: words that just became final (as one segment), the text still in flux (None:
    no partial to send, as between utterances with VAD) and, after the final, an utterance's end."""

    final: Segment | None
    partial: str | None
    events: tuple[SpeechEvent, ...] = ()


class Detector(Protocol):
    """Speech boundaries in audio fed as it comes (``workers.vad.SpeechDetector``), in seconds since its first sample."""

    def feed(self, pcm: np.ndarray) -> list[SpeechEdge]: ...

    @property
    def heard(self) -> float:
        """Seconds of audio looked at so far."""
        ...

    @property
    def last_speech(self) -> float:
        """Where the last speech heard ends (seconds)."""
        ...


def _norm(word: str) -> str:
    return re.sub(r"[^\w']", "", word.lower())


def _segment(words: list[Word]) -> Segment:
    return Segment(
        start=round(words[0].start, 3),
        end=round(words[-1].end, 3),
        text="".join(w.word for w in words).strip(),
        words=tuple(words),
    )


Step = Generator[Window, list[Word], "StreamUpdate"]  # a step: hands out its window (at most once), takes its words


@dataclass
class WindowStreamer:
    decode: Decode
    step_seconds: float = 1.0
    window_seconds: float = 15.0
    detector: Detector | None = None  # with one, only speech is decoded (``stream.vad``)
    batch: DecodeMany | None = None  # hears the windows of streamers sharing it in one call (``step_together``)
    _window: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    _offset: float = 0.0  # stream time of the window's first sample
    _fresh: int = 0  # samples fed since the last step
    _committed: list[Word] = field(default_factory=list)
    _previous: list[Word] = field(default_factory=list)  # the last decode's words beyond the committed ones
    _origin: float = 0.0  # stream time of the detector's first sample
    _heard: list[SpeechEvent] = field(default_factory=list)  # boundaries not yet handed out
    _started: float | None = None  # the utterance in progress began here (None: nobody speaks)
    _ended: float | None = None  # an utterance ended here and its final is not decoded yet
    _later: deque[list[float | None]] = field(default_factory=deque)  # [start, end] of utterances heard since
    _decoded_to: float = 0.0  # stream time up to which the last decode heard the audio
    decodes: int = 0  # decodes made so far

    @property
    def seconds(self) -> float:
        """Stream time fed so far."""
        return self._offset + self._window.size / SAMPLE_RATE

    @property
    def due(self) -> bool:
        if self.detector is not None and (self._ended is not None or self._paused):
            return True
        return self._fresh >= self.step_seconds * SAMPLE_RATE

    @property
    def _paused(self) -> bool:
        """The speaker paused ``PAUSE_S`` ago and no decode has heard all the speech before the pause."""
        if self.detector is None or self._started is None:
            return False
        speech_end = self._origin + self.detector.last_speech
        heard_to = speech_end + PAUSE_S - 1 / SAMPLE_RATE  # a decode to there heard it all, give or take a sample
        return self._origin + self.detector.heard - speech_end >= PAUSE_S and self._decoded_to < heard_to

    @property
    def active(self) -> bool:
        """It decodes as audio comes: always without VAD, with VAD while an utterance is in progress."""
        return self.detector is None or self._started is not None or self._ended is not None

    @property
    def urgent(self) -> bool:
        """An utterance has ended and waits for its final: its listener waits for it now."""
        return self._ended is not None

    def pace(self, step_seconds: float) -> None:
        """Decode after ``step_seconds`` of new audio from now on (the worker stretches steps when overloaded)."""
        self.step_seconds = step_seconds

    def events(self) -> list[SpeechEvent]:
        """The speech boundaries heard since the last call."""
        heard, self._heard = self._heard, []
        return heard

    @property
    def needs_from(self) -> int:
        """The first stream sample a decoder taking over would need: where the window begins."""
        return round(self._offset * SAMPLE_RATE)

    def resume(self, start: int, finals: Sequence[Segment]) -> None:
        """Take over a stream at sample ``start`` from a decoder that confirmed ``finals``: their words
        are the prompt and are not committed again; the audio from ``start`` on is fed as usual."""
        self._offset = self._origin = start / SAMPLE_RATE
        self._committed = [w for segment in finals for w in segment.words]

    def feed(self, pcm: np.ndarray) -> None:
        self._window = np.concatenate([self._window, pcm])
        self._fresh += pcm.size
        if self.detector is None:
            return
        for edge in self.detector.feed(pcm):
            at = round(self._origin + edge.at, 3)
            if edge.kind is Boundary.STARTED:
                if self._ended is None:
                    self._started = at
                else:  # the last utterance's final is not decoded yet: this one waits its turn
                    self._later.append([at, None])
                self._heard.append(SpeechEvent(EventKind.SPEECH_STARTED, at))
            else:
                if self._later:
                    self._later[-1][1] = at
                else:
                    self._ended = at
                self._heard.append(SpeechEvent(EventKind.SPEECH_STOPPED, at))
        if self._started is None:  # nobody speaks: keep only the onset of what may come
            self._fresh = 0
            self._keep_from(self.seconds - PREROLL_S)

    def step(self) -> StreamUpdate:
        """Decode the window; commit the words this decode and the previous one agree on. With VAD, once an
        utterance has ended: decode it, commit all of it, and start the window after it."""
        return self._run(self.stepping())

    def stepping(self) -> Step:
        """``step`` as a generator: it yields the window to decode (if any) and is sent back its words."""
        if self.detector is not None and self._ended is not None:
            return (yield from self._endpoint())
        self._fresh = 0
        current = yield from self._hypothesis(self._speech_samples())
        agreed = 0
        for old, new in zip(self._previous, current, strict=False):
            if _norm(old.word) != _norm(new.word):
                break
            agreed += 1
        final = self._commit(current[:agreed])
        self._previous = current[agreed:]
        self._trim()
        return StreamUpdate(final=final, partial="".join(w.word for w in self._previous).strip())

    def finish(self) -> StreamUpdate:
        """The stream ended: decode what is left once more and commit all of it (with VAD, only an utterance
        in progress, which ends here)."""
        return self._run(self._finishing())

    def _run(self, step: Step) -> StreamUpdate:
        """A step or finish, its decode (if any) made with ``decode``."""
        try:
            window = next(step)
        except StopIteration as done:
            update: StreamUpdate = done.value
            return update
        outcome = _resume(step, self.decode(*window))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _finishing(self) -> Step:
        if self.detector is None:
            final = self._commit((yield from self._hypothesis())) if self._window.size else None
            self._previous = []
            return StreamUpdate(final=final, partial="")
        if self._started is None:
            return StreamUpdate(final=None, partial=None)
        if self._ended is None:
            self._ended = round(self.seconds, 3)
            self._heard.append(SpeechEvent(EventKind.SPEECH_STOPPED, self._ended))
        if self._later:  # utterances heard since, whose finals are not decoded yet, end with this one
            if self._later[-1][1] is None:
                end = round(self.seconds, 3)
                self._later[-1][1] = end
                self._heard.append(SpeechEvent(EventKind.SPEECH_STOPPED, end))
            self._ended = self._later[-1][1]
            self._later.clear()
        return (yield from self._endpoint(whole=True))

    def _endpoint(self, whole: bool = False) -> Step:
        """The utterance that ended at ``_ended``: decode it (and ``TAIL_S`` of the silence after it, or all the
        window if ``whole``), commit every word, say ``utterance``, and start the window after it."""
        assert self._started is not None and self._ended is not None
        end = self.seconds if whole else min(self.seconds, self._ended + TAIL_S)
        if not whole and not self._later and self._decoded_to >= self._ended + min(PAUSE_S, TAIL_S):
            words = self._previous  # the last decode heard the whole utterance: nothing new to hear
        else:
            words = yield from self._hypothesis(round((end - self._offset) * SAMPLE_RATE))
        # a word that begins in the silence after the utterance is one the model made up there ("you")
        final = self._commit([w for w in words if w.start < self._ended + TOLERANCE])
        text = "".join(w.word for w in self._committed if w.end > self._started - TOLERANCE).strip()
        utterance = SpeechEvent(EventKind.UTTERANCE, self._ended, text)
        self._previous = []
        self._started, self._ended = self._later.popleft() if self._later else (None, None)
        self._keep_from(end if self._started is not None else self.seconds - PREROLL_S)
        self._fresh = self._window.size if self._started is not None else 0
        return StreamUpdate(final=final, partial=None, events=(utterance,))

    def _speech_samples(self) -> int | None:
        """With VAD, the window's samples up to ``PAUSE_S`` after the last speech (a step taken late, under
        load, would otherwise hand the model seconds of silence to make words of); all of them without."""
        if self.detector is None:
            return None
        end = self._origin + self.detector.last_speech + PAUSE_S
        return max(0, round((min(self.seconds, end) - self._offset) * SAMPLE_RATE))

    def _keep_from(self, seconds: float) -> None:
        """Drop the window's audio before stream time ``seconds``."""
        cut = min(self._window.size, round((seconds - self._offset) * SAMPLE_RATE))
        if cut > 0:
            self._window = self._window[cut:]
            self._offset += cut / SAMPLE_RATE

    def _hypothesis(self, samples: int | None = None) -> Generator[Window, list[Word], list[Word]]:
        # the prompt is the confirmed text whose audio has left the window: text still in the window is
        # decoded again, and a model given it as a prompt tends to skip its audio
        before = [w for w in self._committed if w.end <= self._offset + TOLERANCE]
        prompt = "".join(w.word for w in before)[-PROMPT_CHARS:].strip()
        pcm = self._window[:samples]
        self._decoded_to = self._offset + pcm.size / SAMPLE_RATE
        self.decodes += 1
        words = [
            Word(
                round(float(w.start) + self._offset, 3),
                round(float(w.end) + self._offset, 3),
                w.word,
                float(w.probability),
            )
            for w in (yield pcm, prompt)
        ]
        last = self._committed[-1].end if self._committed else 0.0
        # timestamps drift between decodes: keep what starts after the committed end, give or take TOLERANCE,
        # then drop words that only repeat the committed tail
        fresh = [w for w in words if w.start >= last - TOLERANCE and _norm(w.word)]
        return fresh[self._repeated(fresh) :]

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


def step_together(streamers: Sequence[WindowStreamer]) -> list[StreamUpdate | Exception]:
    """One step of each of ``streamers`` (which share one ``batch``), every decode they make in one call to it.

    A step that needs no decode (an utterance the last decode already heard whole) ends without one. An
    outcome that is an exception is that streamer's alone (its step failed, or the batch could not hear its
    window) and leaves the streamer unusable: its session ends with the error."""
    batch = streamers[0].batch
    assert batch is not None and all(s.batch == batch for s in streamers), "streamers that do not share a batch"
    outcomes: list[StreamUpdate | Exception | None] = [None] * len(streamers)
    steps = [s.stepping() for s in streamers]
    waiting: list[tuple[int, Window]] = []
    for index, step in enumerate(steps):
        try:
            waiting.append((index, next(step)))
        except StopIteration as done:
            outcomes[index] = done.value
        except Exception as exc:
            outcomes[index] = exc
    heard: list[list[Word] | Exception] = []
    if waiting:
        try:
            heard = batch([window for _, window in waiting])
        except Exception as exc:
            heard = [exc] * len(waiting)
    for (index, _), words in zip(waiting, heard, strict=True):
        outcomes[index] = _resume(steps[index], words)
    ended = [outcome for outcome in outcomes if outcome is not None]
    assert len(ended) == len(streamers), "a step without an outcome"
    return ended


def _resume(step: Step, words: list[Word] | Exception) -> StreamUpdate | Exception:
    """A step that asked for its one decode, handed the words (or the reason there are none) and run to its end;
    a failure is returned, and a step asking for a second decode is one."""
    if isinstance(words, Exception):
        step.close()
        return words
    try:
        step.send(words)
    except StopIteration as done:
        update: StreamUpdate = done.value
        return update
    except Exception as exc:
        return exc
    step.close()
    return RuntimeError("a live step asked for a second decode")
