"""Where a long recording is cut (workers/cutting.py): pure rules on spans and energies, then the real
Silero VAD on speech whose words straddle the naive boundary."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench.clips import DATA, read_wav
from hub.protocol import SAMPLE_RATE
from workers.cutting import MIN_GAP, Cut, Piece, all_speech, find_cut, overlaps, plan, quietest, silero_vad, the_vad

S = SAMPLE_RATE


def test_the_cut_goes_in_the_middle_of_the_longest_pause_of_the_window() -> None:
    speech = [(0, 5 * S), (int(5.3 * S), 8 * S), (int(8.5 * S), 12 * S)]
    assert find_cut(speech, 4 * S, 10 * S) == (8 * S + int(8.5 * S)) // 2  # 0.5 s beats 0.3 s
    assert find_cut(speech, 4 * S, 8 * S) == (5 * S + int(5.3 * S)) // 2  # the longer pause is outside
    assert find_cut([(0, 3 * S), (4 * S, 6 * S), (7 * S, 9 * S)], 0, 9 * S) == int(6.5 * S)  # a tie: the latest


def test_a_pause_shorter_than_min_gap_or_clipped_below_it_is_no_place_to_cut() -> None:
    assert find_cut([(0, 5 * S), (5 * S + MIN_GAP - 1, 10 * S)], 0, 10 * S) is None
    assert find_cut([(0, 5 * S), (6 * S, 10 * S)], int(5.95 * S), 10 * S) is None  # only 50 ms of it in the window...
    assert find_cut([(0, 5 * S), (6 * S, 10 * S)], int(5.8 * S), 10 * S) == int(5.9 * S)  # ... 200 ms are enough
    assert find_cut([], 2 * S, 4 * S) == 3 * S  # no speech at all: the middle
    assert find_cut([(0, 10 * S)], 2 * S, 4 * S) is None


def test_the_quietest_100_ms_wins_and_a_flat_signal_cuts_at_the_latest() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.1, 10 * S).astype(np.float32)
    noise[int(6.2 * S) : int(6.35 * S)] *= 0.01
    at = quietest(noise, 4 * S, 9 * S)
    assert int(6.2 * S) <= at - S // 20 and at + S // 20 <= int(6.35 * S)
    tone = np.sin(np.arange(10 * S) * 2 * np.pi * 440 / S).astype(np.float32)
    assert 8 * S <= quietest(tone, 4 * S, 9 * S) <= 9 * S


def _partition(pieces: list[Piece], total: int) -> None:
    assert pieces[0].start == 0 and pieces[-1].end == total and pieces[-1].cut is Cut.END
    assert all(a.end == b.start for a, b in itertools.pairwise(pieces))


def test_a_plan_partitions_the_audio_into_pieces_no_longer_than_asked() -> None:
    talk = [(k * 2 * S, k * 2 * S + int(1.7 * S)) for k in range(50)]  # 1.7 s of speech, 0.3 s of pause

    def vad(pcm: np.ndarray) -> list[tuple[int, int]]:  # the fake VAD answers for the stretch it is given
        heard.append(pcm.size)
        return talk

    heard: list[int] = []
    pcm = np.zeros(95 * S, dtype=np.float32)  # the fake VAD's spans are relative; only the sizes matter here
    pieces = list(plan(pcm, 30 * S, vad))
    _partition(pieces, pcm.size)
    assert all(p.end - p.start <= 30 * S for p in pieces) and all(p.end - p.start >= 15 * S for p in pieces[:-1])
    assert [p.cut for p in pieces[:-1]] == [Cut.PAUSE] * (len(pieces) - 1)
    assert sum(heard) < 1.6 * pcm.size  # the VAD hears at most half a piece twice


def test_without_a_pause_the_plan_cuts_at_the_quietest_and_marks_silence() -> None:
    pcm = np.sin(np.arange(70 * S) * 2 * np.pi * 300 / S).astype(np.float32)
    pcm[int(22 * S) : int(22.1 * S)] = 0.0
    pieces = list(plan(pcm, 30 * S, lambda chunk: [(0, chunk.size)]))
    _partition(pieces, pcm.size)
    assert pieces[0].cut is Cut.QUIET and abs(pieces[0].end - int(22.05 * S)) <= S // 100
    assert all(p.speech for p in pieces)
    silent = list(plan(np.zeros(70 * S, np.float32), 30 * S, lambda chunk: []))
    _partition(silent, 70 * S)
    assert not any(p.speech for p in silent) and silent[0].cut is Cut.PAUSE


def test_overlaps() -> None:
    assert overlaps([(10, 20)], 19, 30) and not overlaps([(10, 20)], 20, 30) and not overlaps([], 0, 5)


def _talk_with_pauses(names: list[str], pause_s: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The committed clips one after another with ``pause_s`` of silence between; and where each pause is (from
    the end of a clip's speech: a clip ends in about 0.4 s of its own silence)."""
    parts, pauses, at = [], [], 0
    for name in names:
        clip = read_wav(DATA / f"{name}.wav")
        spoken = int(np.nonzero(np.abs(clip) > 0.01)[0][-1]) + 1  # the end of its speech
        parts += [clip, np.zeros(int(pause_s * S), np.float32)]
        pauses.append((at + spoken, at + clip.size + int(pause_s * S)))
        at += clip.size + int(pause_s * S)
    return np.concatenate(parts), pauses


def test_silero_cuts_in_the_pause_before_a_sentence_that_straddles_the_naive_boundary() -> None:
    pytest.importorskip("faster_whisper")
    pcm, pauses = _talk_with_pauses(["coffee", "stella", "weather", "coffee", "stella", "weather"], 0.7)
    piece = 10 * S  # the naive cut at 10 s falls inside "Today the weather is sunny" (9.67-13.6 s)
    naive = [k * piece for k in range(1, pcm.size // piece + 1)]
    assert any(not any(a <= n < b for a, b in pauses) for n in naive), "a naive cut must fall inside speech"
    pieces = list(plan(pcm, piece, silero_vad))
    _partition(pieces, pcm.size)
    assert len(pieces) >= 3
    for p in pieces[:-1]:
        assert p.cut is Cut.PAUSE
        assert any(a + MIN_GAP // 2 <= p.end <= b - MIN_GAP // 2 for a, b in pauses), (
            f"cut at {p.end / S:.2f} s is not in a pause"
        )
    assert all(p.speech for p in pieces[:-1])
    assert pieces[-1].speech is (pieces[-1].start < pauses[-1][0])  # the last may hold only the final pause


def test_silero_hears_no_speech_in_silence_or_a_tone() -> None:
    pytest.importorskip("faster_whisper")
    assert silero_vad(np.zeros(20 * S, np.float32)) == []
    tone = 0.3 * np.sin(np.arange(20 * S) * 2 * np.pi * 440 / S).astype(np.float32)
    pieces = list(plan(tone, 8 * S, silero_vad))
    _partition(pieces, tone.size)


def test_without_faster_whisper_the_plan_cuts_at_the_quietest_and_decodes_every_piece() -> None:
    pcm = np.random.default_rng(3).normal(0, 0.1, 70 * S).astype(np.float32)
    pcm[int(20 * S) : int(20.1 * S)] = 0.0
    pieces = list(plan(pcm, 30 * S, all_speech))
    _partition(pieces, pcm.size)
    assert pieces[0].cut is Cut.QUIET and abs(pieces[0].end - int(20.05 * S)) <= S // 100
    assert all(p.speech for p in pieces) and the_vad() is silero_vad  # faster-whisper is installed here
