"""Whose turn it is on a worker that serves several live sessions and one-shot jobs: a pure function.

Each pass of the worker's loop first takes every message already waiting (so every session's
chunks are in), then gives one turn: to whatever has waited longest since it became due, a
session once it holds ``stream.step_ms`` of new audio, a one-shot job once it arrived. A
session served goes to the back (it waits again only once it is due again), so no session waits
for more than one decode of each other session, and a slow-decoding session cannot starve the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

JOB = ""  # the turn of the oldest one-shot job (session ids are never empty)


def next_turn(due_since: Mapping[str, float], job_since: float | None) -> str | None:
    """The session id to decode next, ``JOB`` for the oldest one-shot job, or None when nothing waits.

    ``due_since``: when each due session became due; ``job_since``: when the oldest waiting job arrived.
    Ties go to sessions, whose listeners wait in real time."""
    turns = [(since, 0, session) for session, since in due_since.items()]
    if job_since is not None:
        turns.append((job_since, 1, JOB))
    return min(turns)[2] if turns else None
