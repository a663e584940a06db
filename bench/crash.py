"""Crash under sessions (issue 14): a worker serving three live sessions is killed with SIGKILL mid-stream.

Three sessions play a clip each (``bench.clips``: three of the committed clips joined, 10-13 s, each word
said once, so that a word said twice can only be the resume's) at the speed of speech, all on one tiny.en
worker (one thread, ``pool.sessions_per_worker`` 3), while a second worker stands ready: the pool is min 1, max 2, and the
autoscaler keeps one worker beyond what the sessions need, so the three open on the first worker before the
second has loaded its model, and the second is ready before the audio starts (checked, not assumed). Mid-stream
the first worker gets SIGKILL; the supervisor moves the sessions to the second, which resumes each from its
last final word. Each run starts a fresh hub, so every run begins in that same layout.

Each session's final text is compared with an undisturbed run of the same clips in the same bench run: the
words confirmed before the kill and after it are joined at the **resume point**, and a word missing there
(**lost**) or said twice there (**doubled**) is what a resume must never cause. Whisper's text is not exactly
repeatable (the decodes fall at other moments, and a resumed decoder's window starts elsewhere), so two
undisturbed runs measure the run-to-run noise, and the resumed text is judged against it: met when no word is
lost or doubled at the resume point and the resumed text's WER against the undisturbed run is within the noise.
The **gap** is the time from the kill to the first partial or final from the new worker; **moved** is its
first part, until the client is told the new worker's name (the supervisor noticed the death and reopened the
session there), the rest is the new worker decoding the sessions' windows in turn.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.clips import build_clips, clip_texts
from bench.hubproc import RunningHub, running_hub, whisper_provider
from bench.progress import say
from hub.client import HubClient
from hub.client.session import StreamEvent, StreamSession
from hub.shm import ROOT as SHM_ROOT
from hub.wer import word_error_rate, words

CHUNK = 1600  # 100 ms at 16 kHz
SESSIONS = 3
SETTLE_S = 120.0  # how long the second worker may take to get ready, and a final to come before the kill


@dataclass(frozen=True)
class CrashPlan:
    kill_at: float = 0.4  # the kill, as a share of the shortest session's audio (later if no word is final yet)
    clients: tuple[str, ...] = ("ring", "inline")  # the SDK on this host (shared-memory ring), and as a remote one
    undisturbed: int = 2  # undisturbed runs: the first is what the resumed runs are compared with, the others the noise
    window_s: float | None = (
        None  # stream.window_seconds (None: the default, 15 s, longer than a clip: resumes from 0 s)
    )


@dataclass(frozen=True)
class Junction:
    """What went wrong where the words confirmed before a resume meet those after it."""

    lost: int  # reference words missing there
    doubled: int  # words said there a second time


def _end_costs(hyp: list[str], ref: list[str]) -> list[int]:
    """For every ``m``: the fewest edits (substitutions, insertions, deletions) from a stretch of ``ref`` that
    ends at word ``m`` (and begins wherever suits best) to ``hyp``."""
    row = [0] * (len(ref) + 1)
    for h in hyp:
        prev, row = row, [row[0] + 1]
        for j, r in enumerate(ref, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (h != r)))
    return row


def junction(reference: list[str], before: list[str], after: list[str]) -> Junction:
    """Lost and doubled words where ``before`` (the words final before the resume) meets ``after`` (those final
    after it), against ``reference`` (an undisturbed run's words). ``before`` is matched to a stretch of the
    reference ending at word ``m``, ``after`` to one beginning at word ``n``: the pair needing the fewest edits,
    and of equals the nearest. ``after`` beginning before ``before`` ended means ``m - n`` words said twice;
    beginning after it, ``n - m`` words that no worker confirmed. The model's noise elsewhere (words missed at
    the start or the end included), or an extra word at the resume point that repeats nothing, moves neither
    end: that is the WER's to count, as is a resumed session that confirmed nothing at all after the resume."""
    ends = _end_costs(before, reference)
    starts = _end_costs(after[::-1], reference[::-1])[::-1]  # starts[n]: a stretch beginning at reference[n]
    m, n = min(
        ((m, n) for m in range(len(reference) + 1) for n in range(len(reference) + 1)),
        key=lambda pair: (ends[pair[0]] + starts[pair[1]], abs(pair[0] - pair[1])),
    )
    return Junction(lost=max(0, n - m), doubled=max(0, m - n))


@dataclass(frozen=True)
class SessionRun:
    """What one session's client saw."""

    text: str  # the final transcript
    before: list[str]  # the final words that arrived before the session moved (all of them if it never did)
    resumes: int
    moved_s: float | None  # kill to the client learning of the new worker (the supervisor's part of the gap)
    gap_s: float | None  # kill to the first event from the new worker
    waits_s: list[float]  # the times between two partials (a decode each) of the session: what a gap compares with


def _record(session: StreamSession, log: list[tuple[float, StreamEvent, int]]) -> None:
    for event in session.results():
        log.append((time.monotonic(), event, session.resumes))


def _play(session: StreamSession, pcm: np.ndarray, begin: float, out: list[Any], index: int) -> None:
    time.sleep(max(0.0, begin - time.monotonic()))
    for offset in range(0, pcm.size, CHUNK):
        time.sleep(max(0.0, begin + offset / 16000 - time.monotonic()))
        session.send(pcm[offset : offset + CHUNK])
    out[index] = session.close()


def _worker_pid(hub: RunningHub, worker: str) -> int:
    return next(w.pid for w in hub.status().providers["whisper"].workers if w.id == worker)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"crash bench: timed out waiting for {what}")
        time.sleep(0.05)


def _serving(hub: RunningHub) -> int:
    return hub.status().providers["whisper"].serving


def one_run(
    hub: RunningHub, pcms: list[np.ndarray], use_shm: bool, kill_at_s: float | None
) -> tuple[list[SessionRun], float | None]:
    """Play ``pcms`` into as many sessions on one worker, killing that worker ``kill_at_s`` into the audio
    (None: undisturbed); returns each session's run and when the kill came (seconds into the audio)."""
    logs: list[list[tuple[float, StreamEvent, int]]] = [[] for _ in pcms]
    transcripts: list[Any] = [None] * len(pcms)
    with HubClient(hub.endpoint, timeout=120, use_shm=use_shm) as client:
        sessions = [client.open_stream("whisper") for _ in pcms]
        homes = {s.worker for s in sessions}
        if len(homes) != 1:
            raise RuntimeError(f"crash bench: the sessions opened on {sorted(map(str, homes))}, not on one worker")
        _wait(lambda: _serving(hub) >= 2, SETTLE_S, "a second worker to take the sessions over")
        readers = [threading.Thread(target=_record, args=(s, log)) for s, log in zip(sessions, logs, strict=False)]
        begin = time.monotonic() + 0.5
        players = [
            threading.Thread(target=_play, args=(s, p, begin, transcripts, i))
            for i, (s, p) in enumerate(zip(sessions, pcms, strict=False))
        ]
        for thread in [*readers, *players]:
            thread.start()
        killed_at = None
        if kill_at_s is not None:
            end = begin + 0.8 * min(p.size for p in pcms) / 16000
            time.sleep(max(0.0, begin + kill_at_s - time.monotonic()))
            while time.monotonic() < end and not all(any(e.kind == "final" for _, e, _ in list(log)) for log in logs):
                time.sleep(0.05)
            pid = _worker_pid(hub, str(next(iter(homes))))
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        moved = _moved(sessions, players) if killed_at is not None else [None] * len(sessions)
        for thread in [*players, *readers]:
            thread.join(SETTLE_S + 60)
    runs = [_session_run(transcripts[i], logs[i], sessions[i].resumes, killed_at, moved[i]) for i in range(len(pcms))]
    return runs, None if killed_at is None else round(killed_at - begin, 2)


def _moved(sessions: list[StreamSession], players: list[threading.Thread]) -> list[float | None]:
    """When each session's client learnt of its new worker (the supervisor's REPLY); None if it never did."""
    moved: list[float | None] = [None] * len(sessions)
    deadline = time.monotonic() + SETTLE_S
    while None in moved and time.monotonic() < deadline and any(p.is_alive() for p in players):
        for i, session in enumerate(sessions):
            if moved[i] is None and session.resumes:
                moved[i] = time.monotonic()
        time.sleep(0.01)
    return moved


def _session_run(
    transcript: Any,
    log: list[tuple[float, StreamEvent, int]],
    resumes: int,
    killed_at: float | None,
    moved: float | None,
) -> SessionRun:
    if transcript is None:
        raise RuntimeError("crash bench: a session did not close")
    before = [w for _, e, resumed in log if e.kind == "final" and not resumed for w in words(e.text)]
    after = [t for t, _, resumed in log if resumed]
    gap = round(after[0] - killed_at, 3) if after and killed_at is not None else None
    moved_s = round(moved - killed_at, 3) if moved is not None and killed_at is not None else None
    times = [t for t, e, _ in log if e.kind == "partial"]
    waits = [b - a for a, b in zip(times, times[1:], strict=False)]
    return SessionRun(text=transcript.text, before=before, resumes=resumes, moved_s=moved_s, gap_s=gap, waits_s=waits)


def compare(run: SessionRun, undisturbed: str, reference: str) -> dict[str, Any]:
    """One resumed session against the undisturbed run of its audio and the clip's reference text."""
    resumed, alone = words(run.text), words(undisturbed)
    split = min(len(run.before), len(resumed))
    spot = junction(alone, resumed[:split], resumed[split:])
    return {
        "words_equal": resumed == alone,
        "lost": spot.lost,
        "doubled": spot.doubled,
        "resume_point_word": split,
        "wer_vs_undisturbed": round(word_error_rate(undisturbed, run.text), 4),
        "wer_vs_reference": round(word_error_rate(reference, run.text), 4),
        "moved_s": run.moved_s,
        "gap_s": run.gap_s,
        "resumes": run.resumes,
        "text": run.text,
    }


def resumed_from(log: str) -> list[float]:
    """Where each resumed session began again (seconds into its audio), from the supervisor's log: 0 while the
    dead worker's window still began at the start of the stream; later once it had trimmed confirmed audio."""
    return sorted(float(x) for x in re.findall(r"session \S+: resumed on \S+ from ([0-9.]+) s", log))


def _waits(waits: list[float]) -> dict[str, float | None]:
    ordered = sorted(waits)
    if not ordered:
        return {"p50": None, "max": None}
    return {"p50": round(ordered[len(ordered) // 2], 3), "max": round(ordered[-1], 3)}


def _segments() -> set[str]:
    """This process's shared-memory segments (rings and one-shot audio) still in /dev/shm."""
    mine = f"_{os.getpid()}_"
    shm_dir = Path("/dev/shm")
    return {p.name for p in shm_dir.glob(f"{SHM_ROOT}*") if mine in p.name} if shm_dir.is_dir() else set()


def measure(workdir: Path, plan: CrashPlan, device: str = "cpu") -> dict[str, Any]:
    clips, texts = build_clips(), clip_texts()
    silence = np.zeros(8000, dtype=np.float32)
    pcms = [np.concatenate([clip, silence]) for clip in clips[:SESSIONS]]
    references = texts[:SESSIONS]
    provider = whisper_provider(1, 1, device)
    provider["pool"].update({"max_size": 2, "sessions_per_worker": SESSIONS})
    if plan.window_s is not None:
        provider["stream"] = {"window_seconds": plan.window_s}
    kill_at_s = round(plan.kill_at * min(p.size for p in pcms) / 16000, 2)
    load = [round(x, 2) for x in os.getloadavg()]

    def run(name: str, use_shm: bool, kill: bool) -> tuple[list[SessionRun], float | None, int, list[float]]:
        say(f"crash under sessions: {name}")
        with running_hub(workdir, f"crash-{name}", {"whisper": provider}) as hub:
            runs, killed = one_run(hub, pcms, use_shm, kill_at_s if kill else None)
            pool = hub.status().providers["whisper"].pool
            resumes = pool.figures.session_resumes if pool else 0
        return runs, killed, resumes, resumed_from(hub.log_path.read_text(errors="replace"))

    first, *others = [run(f"undisturbed-{k + 1}", True, False)[0] for k in range(max(2, plan.undisturbed))]
    second = others[0]
    alone = [r.text for r in first]
    # each session's largest WER between the first undisturbed run and another
    noise = [max(round(word_error_rate(a, other[i].text), 4) for other in others) for i, a in enumerate(alone)]
    crashed: dict[str, Any] = {}
    for client in plan.clients:
        runs, killed, hub_resumes, starts = run(f"sigkill-{client}", client == "ring", True)
        rows = [compare(r, a, ref) for r, a, ref in zip(runs, alone, references, strict=False)]
        met = all(
            r["resumes"] == 1 and r["lost"] == 0 and r["doubled"] == 0 and r["wer_vs_undisturbed"] <= max(noise)
            for r in rows
        )
        crashed[client] = {
            "killed_at_s": killed,
            "hub_session_resumes": hub_resumes,
            "resumed_from_s": starts,
            "sessions": rows,
            "met": met,
        }
    load_after = [round(x, 2) for x in os.getloadavg()]
    figures = {
        "sessions": SESSIONS,
        "audio_s": [round(p.size / 16000, 2) for p in pcms],
        "kill_at_s": kill_at_s,
        "window_s": plan.window_s,
        "noise": {
            "wer": noise,
            "max": max(noise),
            # the same measure as the resumed runs', between the first two undisturbed ones, at the first resume point
            "junction": [
                vars(junction(words(a), words(b.text)[:n], words(b.text)[n:]))
                for a, b, n in zip(
                    alone, second, [r["resume_point_word"] for r in crashed[plan.clients[0]]["sessions"]], strict=False
                )
            ],
        },
        # the waits between two partials of a session in the undisturbed runs: the gap's yardstick
        "undisturbed_wait_s": _waits([w for rs in [first, *others] for r in rs for w in r.waits_s]),
        "undisturbed_wer_vs_reference": [
            [round(word_error_rate(ref, r.text), 4) for r, ref in zip(rs, references, strict=False)]
            for rs in [first, *others]
        ],
        "undisturbed_text": alone,
        "crash": crashed,
        "met": all(c["met"] for c in crashed.values()),
        "load": {"before": load, "after": load_after},
        "shm_left": sorted(_segments()),
    }
    say(f"crash under sessions: {'met' if figures['met'] else 'MISSED'}; run-to-run WER noise up to {max(noise):.1%}")
    return figures
