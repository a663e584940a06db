"""Whose turn it is on a worker that serves several live sessions and one-shot jobs, and how often a
session steps: pure functions.

Each pass of the worker's loop first takes every message already waiting (so every session's
chunks are in), then gives one turn: first to a session whose utterance has just ended (VAD: its
listener waits for the final now), else to whatever has waited longest since it became due, a
session once it holds its step interval of new audio, a one-shot job once it arrived. A session
served goes to the back (it waits again only once it is due again), so no session waits for more
than one decode of each other session, and a slow-decoding session cannot starve the rest.

When a worker's sessions need more decoding than it can do (one decode of each session that is
speaking takes longer than a step), every one of them steps less often, evenly: the step interval
becomes one round of their decodes (``stretched_step``). A step still decodes all the audio up to
now, so nothing queues up: each session's text just comes in larger, later steps, and the worker
keeps time for the finals of utterances that end and for one-shot jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

JOB = ""  # the turn of the oldest one-shot job (session ids are never empty)
SMOOTHING = 0.3  # weight of the newest decode in a session's cost
HEADROOM = 1.1  # a stretched round leaves this much more time than its decodes take


def next_turn(due_since: Mapping[str, float], job_since: float | None, urgent: Iterable[str] = ()) -> str | None:
    """The session id to decode next, ``JOB`` for the oldest one-shot job, or None when nothing waits.

    ``due_since``: when each due session became due; ``job_since``: when the oldest waiting job arrived;
    ``urgent``: due sessions whose utterance has ended (they go first, the longest waiting of them first).
    Ties go to sessions, whose listeners wait in real time."""
    first = [(due_since[s], s) for s in urgent if s in due_since]
    if first:
        return min(first)[1]
    turns = [(since, 0, session) for session, since in due_since.items()]
    if job_since is not None:
        turns.append((job_since, 1, JOB))
    return min(turns)[2] if turns else None


def stretched_step(step_seconds: float, costs: Iterable[float], most: float = float("inf")) -> float:
    """The step interval for every session of a worker: ``step_seconds`` while one decode of each session
    that is speaking (``costs``, seconds each) fits in it, else the time of one such round (with ``HEADROOM``),
    but never more than ``most`` (half the window: a window must not outgrow what one decode can hear).
    A session alone is never stretched: with nobody to share the worker with, it is due again as soon as its
    decode ends (a decode slower than the speech covers more audio), and a client that waits for a step before
    sending more still gets it."""
    costs = list(costs)
    if len(costs) < 2:
        return step_seconds
    return max(step_seconds, min(most, sum(costs) * HEADROOM))


def smoothed(previous: float, latest: float) -> float:
    """A session's decode cost: the first decode's, then a moving average (``SMOOTHING``)."""
    return latest if previous <= 0 else previous + SMOOTHING * (latest - previous)
