"""One long recording across the pool, with real processes and the echo provider (for fault injection):
the pieces each worker saw (by their echo texts), their order, streaming, fairness, cancel, a crash."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from functools import cache

import numpy as np
import pytest

from bench.clips import DATA, read_wav
from hub.errors import InvalidAudio, JobTimeout
from hub.protocol import SAMPLE_RATE
from hub.results import Segment, Transcript
from tests.conftest import echo_provider, wait_for
from workers.cutting import Piece, plan, silero_vad
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(120)

S = SAMPLE_RATE
SPLIT = {"split_over_seconds": 20, "split_piece_seconds": 10}


@cache
def talk(rounds: int = 3) -> np.ndarray:
    """The committed clips in turn with 0.6 s pauses between: 37 s for 3 rounds."""
    parts = []
    for _ in range(rounds):
        for name in ("coffee", "stella", "weather"):
            parts += [read_wav(DATA / f"{name}.wav"), np.zeros(int(0.6 * S), np.float32)]
    return np.concatenate(parts)


@cache
def expected(rounds: int = 3) -> tuple[Piece, ...]:
    """The plan a worker makes of ``talk(rounds)`` (the same VAD, so the same cuts)."""
    return tuple(plan(talk(rounds), SPLIT["split_piece_seconds"] * S, silero_vad))


def pieces_seen(transcript: Transcript) -> list[tuple[float, float, str]]:
    return [(s.start, s.end, s.text) for s in transcript.segments]


def pieces_sent(rounds: int = 3) -> list[tuple[float, float, str]]:
    """What each piece's echo says, where it lies in the audio."""
    pcm = talk(rounds)
    return [
        (round(p.start / S, 3), round(p.end / S, 3), f"{echo_text(pcm[p.start : p.end])} #1")
        for p in expected(rounds)
        if p.speech
    ]


def test_each_worker_decodes_its_piece_of_the_one_segment_and_the_answer_is_stitched_in_order(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, **SPLIT)})
    assert len(expected()) >= 3
    with hub.client() as client:
        shm = client.transcribe(talk(), sleep=0.3)
    with hub.client(use_shm=False) as client:
        inline = client.transcribe(talk())
    for result in (shm, inline):
        assert pieces_seen(result) == pieces_sent()  # each piece saw exactly its samples: none lost, none twice
        assert result.extra == {"pieces": len(expected())} and result.duration == pytest.approx(talk().size / S)
        assert result.text == " ".join(text for *_, text in pieces_sent())  # the segments' texts, joined
    assert set(shm.worker.split(",")) == {"echo-1", "echo-2"}  # both workers took pieces
    line = next(line for line in hub.log().splitlines() if "split into" in line)
    assert f"split into {len(expected())} pieces: 0.0-" in line and "pause" in line
    status = hub.status()["providers"]["echo"]
    assert status["pieces"] == 2 * len(expected()) and status["succeeded"] == 2


def test_split_false_and_short_requests_stay_whole(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, **SPLIT)})
    with hub.client() as client:
        whole = client.transcribe(talk(), split=False)
        short = client.transcribe(talk()[: 15 * S])
        with pytest.raises(Exception, match="split must be True or False"):
            client.transcribe(talk(), split="no")
    assert whole.text == echo_text(talk()) and whole.extra == {}
    assert short.text == echo_text(talk()[: 15 * S])
    assert "split into" not in hub.log()


def test_segments_stream_in_time_order_and_match_the_answer(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, **SPLIT)})
    with hub.client() as client:
        stream = client.transcribe_stream(talk(), sleep=0.2, segments=2)
        segments = list(stream)
    assert stream.transcript is not None and tuple(segments) == stream.transcript.segments
    starts = [s.start for s in segments]
    assert starts == sorted(starts) and len(segments) == 2 * len(pieces_sent())
    assert all(isinstance(s, Segment) and 0 <= s.start <= s.end <= talk().size / S for s in segments)


def test_a_short_request_waits_only_for_the_running_pieces(hub_factory) -> None:
    """Two workers, a long request of many pieces that take 1 s each: a short request sent after it is
    answered after at most one running piece, not after the long request's queued pieces."""
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, max_queue=2, **SPLIT)})
    long_audio = talk(6)
    assert len(expected(6)) >= 8
    finished: dict[str, float] = {}

    def long_request() -> None:
        with hub.client() as client:
            client.transcribe(long_audio, sleep=1.0)
        finished["long"] = time.monotonic()

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_for(lambda: hub.status()["providers"]["echo"]["pieces_in_flight"] == 2, what="two pieces on the workers")
    with hub.client() as client:
        sent = time.monotonic()
        short = client.transcribe(talk()[: 5 * S])  # max_queue 2: the long request's queued pieces count once
        finished["short"] = time.monotonic()
    thread.join(60)
    assert finished["short"] < finished["long"]
    assert finished["short"] - sent < 2.0 and short.queue_ms < 1500, (finished["short"] - sent, short.queue_ms)


def test_a_cancelled_request_leaves_no_piece_queued(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, **SPLIT)})
    pieces = len([p for p in expected(6) if p.speech])
    with hub.client() as client, pytest.raises(JobTimeout):
        client.transcribe(talk(6), sleep=1.0, timeout=2.5)

    def done() -> int:
        return sum(w["jobs_done"] for w in hub.status()["providers"]["echo"]["workers"])

    wait_for(lambda: hub.status()["providers"]["echo"]["pieces_in_flight"] == 0, what="the running pieces to end")
    after = done()
    time.sleep(1.5)  # long enough for a queued piece of 1 s to have started and ended on an idle worker
    assert done() == after and after < pieces + 1, (after, pieces)  # the plan and at most the pieces that ran
    assert hub.status()["providers"]["echo"]["queue_depth"] == 0
    with hub.client() as client:
        assert client.transcribe(talk()[: 5 * S]).text == echo_text(talk()[: 5 * S])


def test_a_worker_killed_mid_request_loses_no_piece_and_doubles_none(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, **SPLIT)})
    result: dict[str, Transcript] = {}

    def run() -> None:
        with hub.client() as client:
            result["t"] = client.transcribe(talk(), sleep=1.0)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: hub.status()["providers"]["echo"]["pieces_in_flight"] == 2, what="two pieces on the workers")
    victim = hub.status()["providers"]["echo"]["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    thread.join(60)
    assert pieces_seen(result["t"]) == pieces_sent()
    assert "retrying on another worker" in hub.log()


def test_pieces_never_make_pool_busy_for_others(hub_factory) -> None:
    """``max_queue`` 2 and three of a long request's pieces waiting: a short request is still queued, because
    the split request counts once."""
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_queue=2, **SPLIT)})

    def long_request() -> None:
        with hub.client() as client:
            client.transcribe(talk(), sleep=0.5)

    thread = threading.Thread(target=long_request)
    thread.start()
    wait_for(lambda: hub.status()["providers"]["echo"]["queue_depth"] >= 3, what="pieces in the queue")
    with hub.client() as client:
        assert client.transcribe(talk()[: 2 * S]).text == echo_text(talk()[: 2 * S])
    thread.join(60)


def test_audio_over_max_audio_seconds_is_refused_as_before(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, **SPLIT)}, hub={"max_audio_seconds": 30})
    with hub.client() as client, pytest.raises(InvalidAudio, match=re.escape("over the limit of 30 s")):
        client.transcribe(talk())
