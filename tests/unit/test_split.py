"""Stitching a split request (hub/supervisor/split.py): times moved by the piece's start, time order,
streamed order, retries that send nothing twice. Pure: no processes."""

from __future__ import annotations

import pytest

from hub.protocol import SAMPLE_RATE
from hub.supervisor.split import Split, shift

S = SAMPLE_RATE


def seg(start: float, end: float, text: str, words: bool = False) -> dict:
    body = {"start": start, "end": end, "text": text}
    if words:
        body["words"] = [{"start": start, "end": end, "word": f" {text}", "probability": 0.9}]
    return body


def result(*segments: dict, language: str | None = "en", ms: float = 100.0) -> dict:
    return {
        "text": " ".join(s["text"] for s in segments),
        "segments": list(segments),
        "language": language,
        "inference_ms": ms,
    }


def three(stream: bool) -> Split:
    split = Split(90 * S, stream)
    for start, end in ((0, 30), (30, 58), (58, 90)):
        split.add(start * S, end * S, True, "pause")
    return split


def test_shift_moves_segment_and_word_times_and_keeps_them_inside_the_piece() -> None:
    moved = shift(seg(1.25, 31.0, "a", words=True), 30.0, 58.0)
    assert (moved["start"], moved["end"]) == (31.25, 58.0)
    assert (moved["words"][0]["start"], moved["words"][0]["end"]) == (31.25, 58.0)


def test_the_plan_must_partition_the_audio() -> None:
    split = Split(60 * S, False)
    split.add(0, 30 * S, True, "pause")
    with pytest.raises(ValueError):
        split.add(31 * S, 60 * S, True, "end")  # a gap
    with pytest.raises(ValueError):
        split.add(30 * S, 61 * S, True, "end")  # past the end
    split.add(30 * S, 60 * S, False, "end")
    assert split.planned
    with pytest.raises(ValueError):
        split.add(60 * S, 60 * S, True, "end")


def test_pieces_done_out_of_order_stitch_in_time_order() -> None:
    split = three(stream=False)
    assert split.done(2, result(seg(0.5, 3.0, "three"), language="de")) == []
    assert not split.complete
    split.done(0, result(seg(0.0, 2.0, "one"), seg(2.0, 29.0, "one more")))
    split.done(1, result(seg(1.0, 4.0, "two"), ms=50.0), worker="w-2")
    assert split.complete
    body = split.result()
    assert [s["start"] for s in body["segments"]] == [0.0, 2.0, 31.0, 58.5]
    assert body["text"] == "one one more two three"
    assert body["language"] == "en" and body["duration"] == 90.0 and body["inference_ms"] == 250.0
    assert body["extra"] == {"pieces": 3} and body["worker"] == "w-2"


def test_a_retried_plan_adds_no_piece_twice() -> None:
    split = Split(60 * S, False)
    assert split.plan_piece(0, 30 * S, True, "pause") == 0
    split.replan()
    assert split.plan_piece(0, 30 * S, True, "pause") is None
    assert split.plan_piece(30 * S, 60 * S, True, "end") == 1 and split.planned


def test_a_silent_piece_adds_nothing_and_the_language_is_the_first_heard() -> None:
    split = Split(60 * S, False)
    split.add(0, 30 * S, False, "pause")
    split.add(30 * S, 60 * S, True, "end")
    split.done(0, None)
    split.done(1, result(seg(0.0, 1.0, "late"), language="fr"))
    assert split.result()["text"] == "late" and split.result()["language"] == "fr"
    assert "0.0-30.0 pause silent" in split.describe() and split.describe().startswith("2 pieces")


def test_segments_stream_in_time_order_as_soon_as_every_earlier_piece_is_done() -> None:
    split = three(stream=True)
    assert split.segment(1, seg(1.0, 2.0, "two")) == []  # piece 0 runs: held
    assert [s["text"] for s in split.segment(0, seg(0.0, 1.0, "one"))] == ["one"]  # the head: at once
    assert split.done(2, result(seg(0.0, 1.0, "three"))) == []  # piece 1 is not done
    out = split.done(0, result(seg(0.0, 1.0, "one"), seg(1.0, 2.0, "one b")))
    assert [s["text"] for s in out] == ["one b", "two"]  # the rest of 0, then what 1 streamed
    assert [s["text"] for s in split.segment(1, seg(3.0, 4.0, "two b"))] == ["two b"]  # 1 is the head now
    out = split.done(1, result(seg(1.0, 2.0, "two"), seg(3.0, 4.0, "two b"), seg(5.0, 6.0, "two c")))
    assert [(s["text"], s["start"]) for s in out] == [("two c", 35.0), ("three", 58.0)]
    assert split.complete and [s["text"] for s in split.result()["segments"]] == [
        "one",
        "one b",
        "two",
        "two b",
        "two c",
        "three",
    ]


def test_a_retried_piece_sends_nothing_twice() -> None:
    split = three(stream=True)
    assert len(split.segment(0, seg(0.0, 1.0, "one"))) == 1
    split.segment(1, seg(0.0, 1.0, "held"))  # piece 1's first worker dies before piece 0 is done
    split.retry(1)
    split.retry(0)  # piece 0's worker dies too
    assert split.segment(0, seg(0.0, 1.0, "one")) == []  # the client has it
    assert [s["text"] for s in split.segment(0, seg(1.0, 2.0, "one b"))] == ["one b"]
    out = split.done(0, result(seg(0.0, 1.0, "one"), seg(1.0, 2.0, "one b")))
    assert out == []
    assert [s["text"] for s in split.segment(1, seg(0.0, 1.0, "held"))] == ["held"]  # decoded again, sent once
    split.done(1, result(seg(0.0, 1.0, "held")))
    split.done(2, result())
    assert [s["text"] for s in split.result()["segments"]] == ["one", "one b", "held"]


def test_a_request_without_stream_gets_no_segments() -> None:
    split = three(stream=False)
    assert split.segment(0, seg(0.0, 1.0, "one")) == []
    assert split.done(0, result(seg(0.0, 1.0, "one"))) == []
