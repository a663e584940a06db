"""A long request split into pieces: its plan as it arrives, what each piece answered, which segments
may go to the client now, and the stitched answer. Pure bookkeeping: no jobs, sockets or clock.

A piece's segments come with times from the piece's start; they are moved by the piece's start (and kept
inside the piece) here, once. Segments reach the client in time order: those of the first piece not
done yet go at once, those of a later piece wait until every earlier piece is done. A piece retried on
another worker (its first worker died) decodes again from its start: the segments the client already
has of it are not sent twice, and the stitched answer keeps them as they were sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hub.protocol import SAMPLE_RATE
from hub.results import join_text


def shift(segment: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """``segment`` (times from its piece's start) with times from the audio's start, kept inside
    ``[start, end]``, the piece's place in the audio in seconds."""

    def at(t: Any) -> float:
        return round(min(max(start + float(t), start), end), 3)

    moved = {**segment, "start": at(segment.get("start", 0.0)), "end": at(segment.get("end", 0.0))}
    if segment.get("words"):
        moved["words"] = [{**w, "start": at(w["start"]), "end": at(w["end"])} for w in segment["words"]]
    return moved


@dataclass
class PieceState:
    """One piece: where it lies (samples), whether it is decoded, what came back."""

    start: int
    end: int
    speech: bool  # the VAD heard speech in it; a piece without is done at once, empty
    cut: str  # how its end was chosen (``workers.cutting.Cut``)
    job: str = ""  # the PIECE job decoding it
    result: dict[str, Any] | None = None  # its RESULT body, times from the audio's start, once done
    sent: list[dict[str, Any]] = field(default_factory=list)  # segments the client has of it
    held: list[dict[str, Any]] = field(default_factory=list)  # segments waiting for an earlier piece
    seen: int = 0  # segments heard from the current attempt
    worker: str = ""  # the worker that decoded it

    @property
    def seconds(self) -> tuple[float, float]:
        return self.start / SAMPLE_RATE, self.end / SAMPLE_RATE

    @property
    def done(self) -> bool:
        return self.result is not None


class Split:
    """The pieces of one request, in audio order. ``stream``: the client wants segments as they come."""

    def __init__(self, samples: int, stream: bool) -> None:
        self.samples = samples
        self.stream = stream
        self.pieces: list[PieceState] = []
        self.planned = False  # the plan has its last piece
        self.head = 0  # the first piece not done (its segments go to the client at once)
        self.heard = 0  # pieces heard from the plan's current attempt

    def plan_piece(self, start: int, end: int, speech: bool, cut: str) -> int | None:
        """A piece the plan job sent: its index, or None for one known from the plan's attempt before a retry."""
        self.heard += 1
        if self.heard <= len(self.pieces):
            return None
        return self.add(start, end, speech, cut)

    def replan(self) -> None:
        """The plan job starts again on another worker: it will send its pieces from the first."""
        self.heard = 0

    def add(self, start: int, end: int, speech: bool, cut: str) -> int:
        """The plan's next piece; it must start where the last one ended. Returns its index."""
        at = self.pieces[-1].end if self.pieces else 0
        if self.planned or start != at or not start < end <= self.samples:
            raise ValueError(
                f"piece [{start}, {end}) does not follow the plan (next piece starts at {at} of {self.samples})"
            )
        self.pieces.append(PieceState(start, end, speech, cut))
        self.planned = end == self.samples
        return len(self.pieces) - 1

    def segment(self, index: int, body: dict[str, Any]) -> list[dict[str, Any]]:
        """A segment piece ``index`` streamed: what to send the client now (it, or nothing yet)."""
        piece = self.pieces[index]
        piece.seen += 1
        if piece.done or piece.seen <= len(piece.sent) or not self.stream:
            return []  # the client has it already (from before a retry)
        moved = shift(body, *piece.seconds)
        if index != self.head:
            piece.held.append(moved)
            return []
        piece.sent.append(moved)
        return [moved]

    def retry(self, index: int) -> None:
        """Piece ``index`` starts again on another worker: it will stream its segments from the first."""
        piece = self.pieces[index]
        piece.seen = 0
        piece.held.clear()

    def done(self, index: int, body: dict[str, Any] | None, worker: str = "") -> list[dict[str, Any]]:
        """Piece ``index`` answered (``body``, its RESULT, from ``worker``; None for a piece without speech,
        never decoded): the segments the client may have now, in order."""
        piece = self.pieces[index]
        piece.worker = worker
        body = body or {"text": "", "segments": [], "language": None, "inference_ms": 0.0}
        segments = [shift(s, *piece.seconds) for s in body.get("segments", ())]
        piece.result = {**body, "segments": piece.sent + segments[len(piece.sent) :]}
        piece.held.clear()  # the result has them all
        out: list[dict[str, Any]] = []
        while self.head < len(self.pieces) and self.pieces[self.head].done:
            head = self.pieces[self.head]
            if self.stream:
                out += head.result["segments"][len(head.sent) :]  # type: ignore[index]
            head.sent = list(head.result["segments"])  # type: ignore[index]
            self.head += 1
            if self.head < len(self.pieces) and self.stream:
                waiting = self.pieces[self.head]
                out += waiting.held
                waiting.sent += waiting.held
                waiting.held = []
        return out

    @property
    def complete(self) -> bool:
        return self.planned and self.head == len(self.pieces)

    def result(self) -> dict[str, Any]:
        """The stitched RESULT: every piece's segments in order, their texts joined, the first piece's
        language (the first that has one), the whole audio's duration, the decoding time of all pieces."""
        results = [p.result or {} for p in self.pieces]
        segments = [s for r in results for s in r.get("segments", ())]
        languages = [r["language"] for r in results if r.get("language")]
        return {
            "text": join_text(str(s.get("text", "")) for s in segments),
            "segments": segments,
            "language": languages[0] if languages else None,
            "duration": self.samples / SAMPLE_RATE,
            "inference_ms": sum(float(r.get("inference_ms", 0.0)) for r in results),
            "worker": ",".join(dict.fromkeys(p.worker for p in self.pieces if p.worker)),
            "extra": {"pieces": len(self.pieces)},
        }

    def describe(self) -> str:
        """How the audio was cut, for the log: ``4 pieces: 0.0-28.3 pause, 28.3-57.9 quiet, ...``."""
        parts = [
            f"{p.start / SAMPLE_RATE:.1f}-{p.end / SAMPLE_RATE:.1f} {p.cut}{'' if p.speech else ' silent'}"
            for p in self.pieces
        ]
        return f"{len(self.pieces)} pieces: {', '.join(parts)}"
