"""What a live session needs to move to another worker when its worker dies: pure functions, no I/O.

A worker tells, with every PARTIAL and SEGMENT, from which sample on a worker taking over would need
the audio (``keep``: where its decoder's window begins, bounded). The client's ring keeps everything
from there on; for a client that sends its chunks inline, the supervisor keeps the same stretch
(``AudioTail``). A resumed session starts at ``keep``, with the finals whose words still matter to
the decoder (``context``); the finals the dead workers confirmed go into the answer (``merge_result``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from hub.results import join_text

CONTEXT_CHARS = 200  # final text before the resume point the new decoder gets (its prompt; streaming.PROMPT_CHARS)


def keep_from(decoder_start: int, read: int, bound: int) -> int:
    """The first sample a worker taking over needs: where the decoder's state begins, but never more
    than ``bound`` samples before what the worker has read (a window that grows without a final word
    must not pin the client's ring; what lies before is then decoded by no one, which costs no final word)."""
    return min(read, max(decoder_start, read - bound))


def context(finals: Sequence[dict[str, Any]], start: float, chars: int = CONTEXT_CHARS) -> list[dict[str, Any]]:
    """The final segments a resumed decoder needs: those ending after ``start`` seconds (their audio is
    decoded again, and their words must not come out a second time) and enough before it to make
    ``chars`` characters of prompt."""
    first = len(finals)
    text = 0
    while first > 0 and (float(finals[first - 1]["end"]) > start or text < chars):
        first -= 1
        if float(finals[first]["end"]) <= start:
            text += len(str(finals[first]["text"])) + 1
    return list(finals[first:])


def merge_result(carried: Sequence[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    """A resumed session's RESULT: the finals confirmed before the last resume, then the new worker's."""
    texts = [*(str(s["text"]) for s in carried), str(body.get("text", ""))]
    return {**body, "segments": [*carried, *body.get("segments", ())], "text": join_text(texts)}


class AudioTail:
    """The recent audio of an inline session, as the supervisor forwarded it: samples ``[start, end)``,
    at most ``limit`` of them (``stream.window_seconds``), and nothing before the worker's ``keep``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.start = 0
        self.end = 0
        self._chunks: deque[bytes] = deque()  # float32 samples, the first starting at ``start``

    def append(self, payload: bytes, keep: int) -> None:
        self._chunks.append(payload)
        self.end += len(payload) // 4
        self._trim(max(keep, self.end - self.limit))

    def since(self, keep: int) -> tuple[int, bytes]:
        """Where a resumed session starts (``keep``, or the oldest sample kept if that is later) and the
        audio from there to the end."""
        self._trim(keep)
        return self.start, b"".join(self._chunks)

    def _trim(self, position: int) -> None:
        drop = min(position, self.end) - self.start
        while drop > 0 and self._chunks:
            first = self._chunks[0]
            samples = len(first) // 4
            if samples <= drop:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[drop * 4 :]
                samples = drop
            self.start += samples
            drop -= samples
