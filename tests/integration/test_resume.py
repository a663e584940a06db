"""A live session survives its worker's death: the pure rules of a resume, then real workers killed
with SIGKILL under sessions of local (ring) and remote (inline) clients, echo and whisper."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from hub import protocol
from hub.audio import to_pcm
from hub.errors import BadRequest, WorkerCrashed
from hub.results import Segment
from hub.resume import AudioTail, context, keep_from, merge_result
from tests.conftest import DATA, Hub, echo_provider, wait_for
from workers.echo import echo_words
from workers.streaming import WindowStreamer

pytestmark = pytest.mark.timeout(180)

STEPS = np.concatenate([np.full(8000, 0.01 * (i + 1), dtype=np.float32) for i in range(12)])  # echo "words"
CHUNK = 1600


def segment(start: float, end: float, text: str) -> dict:
    return {"start": start, "end": end, "text": text, "words": []}


# --- pure rules ---------------------------------------------------------------------------------


def test_keep_is_the_decoders_start_bounded_below_what_was_read() -> None:
    assert keep_from(decoder_start=8000, read=40000, bound=160000) == 8000
    assert keep_from(decoder_start=0, read=400000, bound=160000) == 240000  # a window with no final word
    assert keep_from(decoder_start=50000, read=40000, bound=160000) == 40000  # never past what was read


def test_context_is_the_finals_still_in_the_window_and_a_prompts_worth_before() -> None:
    finals = [segment(i, i + 1, "x" * 90) for i in range(6)]
    assert context(finals, start=6.0) == finals[3:]  # 3 x 91 characters >= 200: enough prompt
    assert context(finals, start=4.5) == finals[1:]  # the two ending past 4.5 s, then the prompt
    assert context(finals, start=0.0) == finals
    assert context([], start=3.0) == []
    assert context(finals[:1], start=9.0) == finals[:1]


def test_a_resumed_result_carries_the_finals_confirmed_before() -> None:
    carried = [segment(0, 1, "hello there"), segment(1, 2, "general")]
    body = {"text": "kenobi.", "segments": [segment(2, 3, "kenobi.")], "duration": 3.0}
    merged = merge_result(carried, body)
    assert merged["text"] == "hello there general kenobi."
    assert [s["text"] for s in merged["segments"]] == ["hello there", "general", "kenobi."]
    assert merged["duration"] == 3.0


def test_the_audio_tail_keeps_at_most_its_limit_and_nothing_before_keep() -> None:
    tail = AudioTail(limit=10)
    pcm = np.arange(25, dtype=np.float32)
    for start in range(0, 25, 4):  # chunks of 4 samples, the last one 1
        tail.append(pcm[start : start + 4].tobytes(), keep=0)
    assert (tail.start, tail.end) == (15, 25)
    start, payload = tail.since(keep=3)  # keep older than what is left: from the oldest sample kept
    assert start == 15 and np.array_equal(np.frombuffer(payload, dtype=np.float32), pcm[15:])
    start, payload = tail.since(keep=22)
    assert start == 22 and np.array_equal(np.frombuffer(payload, dtype=np.float32), pcm[22:])
    tail.append(pcm[:2].tobytes(), keep=27)  # a keep past the end keeps nothing but what comes after
    assert tail.since(keep=27) == (27, b"")


def test_resume_fields_are_checked_at_the_edge() -> None:
    assert protocol.parse_resume({}) is None
    resume = protocol.parse_resume({"resume": {"start": 8000, "finals": [segment(0, 0.5, "a")]}})
    assert resume is not None and resume.start == 8000 and resume.to_dict()["finals"][0]["text"] == "a"
    for bad in ({"start": -1, "finals": []}, {"start": True, "finals": []}, {"start": 0, "finals": ["x"]}, []):
        with pytest.raises(BadRequest, match="resume"):
            protocol.parse_resume({"resume": bad})


def _stream(audio: np.ndarray, take_over_after: int | None) -> str:
    """Stream ``audio`` in 100 ms chunks through the echo decoder; after ``take_over_after`` chunks a fresh
    streamer takes over as a resumed worker would: from ``keep``, knowing the finals' ``context``."""
    streamer = WindowStreamer(lambda pcm, prompt: echo_words(pcm), 1.0, 2.0)
    finals: list[Segment] = []
    read = 0
    for index, start in enumerate(range(0, audio.size, CHUNK)):
        if index == take_over_after:
            keep = keep_from(streamer.needs_from, read, 32000)
            streamer = WindowStreamer(lambda pcm, prompt: echo_words(pcm), 1.0, 2.0)
            known = [Segment.from_dict(f) for f in context([f.to_dict() for f in finals], keep / 16000)]
            streamer.resume(keep, known)
            streamer.feed(audio[keep:read])
        streamer.feed(audio[start : start + CHUNK])
        read = start + CHUNK
        if streamer.due and (update := streamer.step()).final is not None:
            finals.append(update.final)
    if (last := streamer.finish().final) is not None:
        finals.append(last)
    return " ".join(s.text for s in finals)


@pytest.mark.parametrize("after", [7, 23, 31, 55])
def test_a_streamer_taking_over_confirms_the_same_words_as_one_left_alone(after: int) -> None:
    """A 2 s window over 6 s of echo "words": taken over before, at and after the window was trimmed."""
    alone = _stream(STEPS, None)
    assert alone.split() == [f"a{10 * (i + 1)}" for i in range(12)]
    assert _stream(STEPS, after) == alone


# --- real workers killed under sessions ---------------------------------------------------------


def _worker_pid(hub: Hub, worker: str) -> int:
    return next(w["pid"] for p in hub.status()["providers"].values() for w in p["workers"] if w["id"] == worker)


def _send(session, pcm: np.ndarray) -> None:
    for start in range(0, pcm.size, CHUNK):
        session.send(pcm[start : start + CHUNK])


def _send_seconds(session, pcm: np.ndarray, events: list) -> None:
    """Send a second at a time, each once the worker decoded the one before (so that words get final)."""
    for start in range(0, pcm.size, 16000):
        decodes = sum(e.kind == "partial" for e in list(events))
        _send(session, pcm[start : start + 16000])
        wait_for(lambda before=decodes: sum(e.kind == "partial" for e in list(events)) > before, what="a decode")


def _kill_after_a_final(hub: Hub, session, events: list) -> str:
    """SIGKILL the session's worker once a word is final; returns the worker killed."""
    assert any(e.kind == "final" for e in list(events)), "a word must be final before the kill"
    worker = session.worker
    os.kill(_worker_pid(hub, worker), signal.SIGKILL)
    return worker


@pytest.mark.parametrize("use_shm", [True, False], ids=["ring", "inline"])
def test_a_session_moves_to_another_worker_when_its_worker_is_killed(hub_factory, use_shm: bool) -> None:
    """The client sees no error; its final text is an undisturbed run's, no word lost or doubled."""
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})
    with hub.client(use_shm=use_shm) as client:
        with client.open_stream() as undisturbed:
            _send(undisturbed, STEPS)
        session = client.open_stream()
        events: list = []
        reader = threading.Thread(target=lambda: events.extend(session.results()))
        reader.start()
        half = STEPS.size // 2
        _send_seconds(session, STEPS[:half], events)
        killed = _kill_after_a_final(hub, session, events)
        _send(session, STEPS[half:])  # while the session moves, and after
        wait_for(lambda: session.resumes == 1, what="the session resumed on another worker")
        transcript = session.close()
        reader.join(30)
    assert session.worker != killed
    assert transcript.text == undisturbed.transcript.text, (transcript.text, undisturbed.transcript.text)
    assert " ".join(e.text for e in events if e.kind == "final") == transcript.text  # no final repeated to the client
    assert transcript.duration == pytest.approx(STEPS.size / 16000, abs=0.01)
    assert hub.status()["providers"]["echo"]["session_resumes"] == 1


def test_a_session_whose_resume_also_dies_ends_with_worker_crashed_and_keeps_its_text(hub_factory) -> None:
    """pool.retry_on_crash 1: one resume; the second death ends the session, its confirmed text kept."""
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, retry_on_crash=1)})
    with hub.client() as client:
        session = client.open_stream()
        events: list = []
        failed: list[BaseException] = []

        def read() -> None:
            try:
                for event in session.results():
                    events.append(event)
            except WorkerCrashed as exc:
                failed.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        _send_seconds(session, STEPS[:32000], events)
        _kill_after_a_final(hub, session, events)
        wait_for(lambda: session.resumes == 1, what="the first resume")
        finals_before = sum(e.kind == "final" for e in list(events))
        _send_seconds(session, STEPS[32000:64000], events)
        wait_for(
            lambda: sum(e.kind == "final" for e in list(events)) > finals_before, what="a final from the new worker"
        )
        os.kill(_worker_pid(hub, session.worker), signal.SIGKILL)
        reader.join(30)
        assert failed, "the second death must end the session"
        confirmed = " ".join(e.text for e in events if e.kind == "final")
        assert confirmed.split()[:3] == ["a10", "a20", "a30"] and len(set(confirmed.split())) == len(confirmed.split())
        assert failed[0].transcript.text == confirmed  # type: ignore[attr-defined]
        with pytest.raises(WorkerCrashed):
            session.close()
    assert hub.status()["providers"]["echo"]["session_resumes"] == 1


def test_a_whisper_session_resumed_after_sigkill_confirms_an_undisturbed_runs_words(hub_factory) -> None:
    """The real model, its decodes at the same places in both runs (each second sent, the test waits
    for its decode): the worker is killed after the third decode; the new worker decodes the dead one's
    window again and goes on, and the finals are word for word the undisturbed run's. (The audio reaches the
    worker through the shared-memory ring; the echo test above resumes over both transports.)"""
    provider = {
        "model": "tiny.en",
        "device": "cpu",
        "cpu_threads": 1,
        "stream": {"vad": False},  # a decode every second, so both runs decode at the same places
        "pool": {"min_size": 2, "max_size": 2},
    }
    hub = hub_factory({"whisper": provider})
    pcm = np.concatenate([to_pcm(DATA / "coffee.wav"), np.zeros(8000, dtype=np.float32)])
    seconds = [pcm[i : i + 16000] for i in range(0, pcm.size, 16000)]

    def run(kill_after: int | None) -> tuple[list[str], int]:
        with hub.client(timeout=60) as client:
            session = client.open_stream()
            events: list = []
            reader = threading.Thread(target=lambda: events.extend(session.results()))
            reader.start()
            decodes = 0
            for index, second in enumerate(seconds):
                _send(session, second)
                if second.size == 16000:
                    decodes += 1
                    wait_for(
                        lambda n=decodes: sum(e.kind == "partial" for e in list(events)) >= n,
                        timeout=60,
                        what="a decode",
                    )
                if index + 1 == kill_after:
                    os.kill(_worker_pid(hub, session.worker), signal.SIGKILL)
                    wait_for(lambda: session.resumes == 1, timeout=60, what="the resume")
                    decodes += 1  # the new worker decodes the window it took over at once
                    wait_for(
                        lambda n=decodes: sum(e.kind == "partial" for e in list(events)) >= n,
                        timeout=60,
                        what="the resumed decode",
                    )
            transcript = session.close()
            reader.join(30)
        assert " ".join(e.text for e in events if e.kind == "final") == transcript.text
        return [s.text for s in transcript.segments], session.resumes

    alone, _ = run(None)
    resumed, resumes = run(3)
    assert resumes == 1 and alone
    assert " ".join(resumed).split() == " ".join(alone).split(), (resumed, alone)
