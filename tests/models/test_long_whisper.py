"""A long recording split across two tiny.en workers: as good as the whole-file decode, in order, streamed
in order, whole after a worker is killed mid-request; silence and a tone come back without an error."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from bench.clips import DATA, read_wav
from hub.protocol import SAMPLE_RATE
from hub.results import Transcript
from tests.conftest import Hub, reference, start_hub, wait_for, word_error_rate

pytestmark = pytest.mark.timeout(240)

S = SAMPLE_RATE
ORDER = ("coffee", "weather", "stella", "hello", "stella", "coffee", "weather", "stella", "coffee")
PAUSES = (0.5, 0.9, 0.6, 0.8, 0.5, 0.7, 0.9, 0.6, 0.5)


def recording() -> tuple[np.ndarray, str]:
    """~40 s: the committed clips with pauses between, and what they say."""
    parts = [
        p
        for name, pause in zip(ORDER, PAUSES, strict=True)
        for p in (read_wav(DATA / f"{name}.wav"), np.zeros(int(pause * S), np.float32))
    ]
    return np.concatenate(parts), " ".join(reference(name) for name in ORDER)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    pool = {"min_size": 2, "max_size": 2, "split_over_seconds": 20, "split_piece_seconds": 12}
    started = start_hub(
        tmp_path_factory.mktemp("long"), {"whisper": {"model": "tiny.en", "cpu_threads": 1, "pool": pool}}
    )
    yield started
    assert started.stop() == 0


@pytest.fixture(scope="module")
def answers(hub: Hub) -> dict[str, Transcript]:
    pcm, _ = recording()
    with hub.client(timeout=120) as client:
        return {"whole": client.transcribe(pcm, split=False), "split": client.transcribe(pcm)}


def test_split_is_as_good_as_the_whole_file_and_in_order(answers: dict[str, Transcript]) -> None:
    pcm, said = recording()
    whole, split = answers["whole"], answers["split"]
    assert split.extra["pieces"] >= 3 and "pieces" not in whole.extra
    assert word_error_rate(said, split.text) <= word_error_rate(said, whole.text) + 0.015, (split.text, whole.text)
    ends = [(s.start, s.end) for s in split.segments]
    assert all(0 <= a <= b <= pcm.size / S for a, b in ends) and ends == sorted(ends)
    assert split.language == "en" and split.duration == pytest.approx(pcm.size / S)


def test_segments_stream_in_time_order(hub: Hub, answers: dict[str, Transcript]) -> None:
    pcm, _ = recording()
    with hub.client(timeout=120) as client:
        stream = client.transcribe_stream(pcm)
        segments = list(stream)
    assert stream.transcript is not None and tuple(segments) == stream.transcript.segments
    assert [s.start for s in segments] == sorted(s.start for s in segments)
    assert stream.transcript.text == answers["split"].text


def test_five_minutes_of_silence_is_empty_text_and_a_tone_still_returns(hub: Hub) -> None:
    with hub.client(timeout=120) as client:
        silence = client.transcribe(np.zeros(300 * S, np.float32))
        tone = client.transcribe((0.3 * np.sin(np.arange(180 * S) * 2 * np.pi * 440 / S)).astype(np.float32))
    assert silence.text == "" and silence.segments == () and silence.duration == 300.0
    assert silence.extra["pieces"] >= 20
    assert tone.duration == 180.0 and tone.extra["pieces"] >= 12


def test_a_worker_killed_mid_request_loses_no_piece_and_doubles_none(hub: Hub, answers: dict[str, Transcript]) -> None:
    pcm, _ = recording()
    result: dict[str, Transcript] = {}

    def run() -> None:
        with hub.client(timeout=120) as client:
            result["t"] = client.transcribe(pcm)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: hub.status()["providers"]["whisper"]["pieces_in_flight"] >= 1, what="a piece on a worker")
    busy = [w for w in hub.status()["providers"]["whisper"]["workers"] if w["state"] == "busy"]
    os.kill(busy[0]["pid"], signal.SIGKILL)
    thread.join(120)
    assert result["t"].text == answers["split"].text  # the lost piece decoded again, once
    wait_for(lambda: hub.status()["providers"]["whisper"]["size"] == 2, timeout=60, what="the worker replaced")
