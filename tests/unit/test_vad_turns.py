"""VAD-gated steps, endpointing and load-aware turns, without processes: a scripted detector and decoder on
stream time, the real Silero model on the committed clips, and the pure turn and placement rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from hub.errors import BadRequest
from hub.protocol import parse_turn_detection
from hub.results import Word
from hub.supervisor.assignment import FRESH_DUTY, WorkerLoad, session_home
from hub.supervisor.pool import SessionTurn, session_turns
from tests.conftest import DATA
from workers.streaming import PREROLL_S, EventKind, SpeechEvent, WindowStreamer
from workers.turns import HEADROOM, JOB, next_turn, smoothed, stretched_step
from workers.vad import FRAME, Boundary, SileroStream, SpeechDetector, SpeechEdge, SpeechGate, silero_session

RATE = 16000
CHUNK = 0.1  # seconds per fed chunk, as a microphone client sends


# --- the gate: probabilities to boundaries ----------------------------------------------------------


def test_speech_starts_at_the_first_speech_frame_and_ends_after_endpoint_silence_at_its_last_speech() -> None:
    gate = SpeechGate(threshold=0.5, endpoint_s=0.3, frame_s=0.1)
    assert gate.push([0.1, 0.2]) == []
    assert gate.push([0.9]) == [SpeechEdge(Boundary.STARTED, 0.2)]
    # 0.4 is under the threshold but above threshold - 0.15: still speech (hysteresis)
    assert gate.push([0.8, 0.4, 0.1, 0.1]) == []
    assert gate.speaking
    assert gate.push([0.1]) == [SpeechEdge(Boundary.STOPPED, 0.5)]  # 0.3 s of silence after speech ending at 0.5
    assert not gate.speaking
    assert gate.push([0.95]) == [SpeechEdge(Boundary.STARTED, 0.8)]


def test_a_short_pause_does_not_end_the_utterance() -> None:
    gate = SpeechGate(threshold=0.5, endpoint_s=0.5, frame_s=0.1)
    edges = gate.push([0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9] + [0.0] * 5)
    assert edges == [SpeechEdge(Boundary.STARTED, 0.0), SpeechEdge(Boundary.STOPPED, 0.7)]


def _clip(name: str) -> np.ndarray:
    from hub.audio import to_pcm

    return to_pcm(DATA / f"{name}.wav")


def test_silero_fed_in_pieces_gives_the_probabilities_of_one_pass() -> None:
    pcm = _clip("hello")
    whole = SileroStream(silero_session())(pcm)
    stream = SileroStream(silero_session())
    pieces = [stream(pcm[i : i + 1000]) for i in range(0, pcm.size, 1000)]  # chunks that split frames
    assert whole.size == pcm.size // FRAME
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)


def test_the_detector_hears_a_real_utterance_between_silences() -> None:
    speech = _clip("coffee")
    pcm = np.concatenate([np.zeros(2 * RATE, np.float32), speech, np.zeros(2 * RATE, np.float32)])
    detector = SpeechDetector(threshold=0.5, endpoint_ms=600)
    edges = [e for i in range(0, pcm.size, 1600) for e in detector.feed(pcm[i : i + 1600])]
    assert [e.kind for e in edges] == [Boundary.STARTED, Boundary.STOPPED]
    speech_end = 2 + speech.size / RATE
    assert 1.9 <= edges[0].at <= 2.6  # the clip begins at 2 s (its first word a little after)
    assert speech_end - 1.0 <= edges[1].at <= speech_end + 0.1


# --- the gated streamer, with a scripted detector and decoder -------------------------------------


@dataclass
class ScriptedDetector:
    """Speech from ``start`` to ``end`` seconds of what it is fed; it says so ``endpoint`` after the end."""

    utterances: list[tuple[float, float]]
    endpoint: float = 0.6
    fed: float = 0.0
    said: set[tuple[Boundary, float]] = field(default_factory=set)

    @property
    def heard(self) -> float:
        return self.fed

    @property
    def last_speech(self) -> float:
        return max([min(end, self.fed) for start, end in self.utterances if start <= self.fed], default=0.0)

    def feed(self, pcm: np.ndarray) -> list[SpeechEdge]:
        self.fed += pcm.size / RATE
        edges = []
        for start, end in self.utterances:
            for kind, at, heard_at in ((Boundary.STARTED, start, start), (Boundary.STOPPED, end, end + self.endpoint)):
                if self.fed >= heard_at - 1e-9 and (kind, at) not in self.said:
                    self.said.add((kind, at))
                    edges.append(SpeechEdge(kind, at))
        return edges


@dataclass
class ScriptedDecoder:
    """A word every 0.5 s of speech (stream time), named by where it ends; counts its decodes."""

    utterances: list[tuple[float, float]]
    streamer: WindowStreamer | None = None
    decodes: int = 0

    def __call__(self, pcm: np.ndarray, prompt: str) -> list[Word]:
        assert self.streamer is not None
        self.decodes += 1
        offset, length = self.streamer._offset, pcm.size / RATE
        words = []
        for start, end in self.utterances:
            t = start
            while t + 0.5 <= end + 1e-9:
                if offset - 1e-9 <= t and t + 0.5 <= offset + length + 1e-9:
                    words.append(
                        Word(round(t - offset, 3), round(t + 0.5 - offset, 3), f" w{round((t + 0.5) * 10)}", 0.9)
                    )
                t += 0.5
        return words


def gated(utterances: list[tuple[float, float]], endpoint: float = 0.6) -> tuple[WindowStreamer, ScriptedDecoder]:
    decoder = ScriptedDecoder(utterances)
    streamer = WindowStreamer(
        decoder, step_seconds=1.0, window_seconds=15.0, detector=ScriptedDetector(utterances, endpoint)
    )
    decoder.streamer = streamer
    return streamer, decoder


def play(streamer: WindowStreamer, seconds: float) -> list[tuple[float, object]]:
    """Feed ``seconds`` of audio in 100 ms chunks, stepping whenever due; what came out, with the stream time."""
    out: list[tuple[float, object]] = []
    for _ in range(round(seconds / CHUNK)):
        streamer.feed(np.zeros(round(CHUNK * RATE), np.float32))
        out += [(streamer.seconds, e) for e in streamer.events()]
        if streamer.due:
            update = streamer.step()
            out += [(streamer.seconds, x) for x in (update.final, update.partial, *update.events) if x is not None]
    return out


def test_silence_is_never_decoded_and_the_window_keeps_only_the_onset_to_come() -> None:
    streamer, decoder = gated([])
    assert play(streamer, 20.0) == []
    assert decoder.decodes == 0
    assert streamer.seconds - streamer._offset <= PREROLL_S + 1e-9
    assert streamer.needs_from >= round((20.0 - PREROLL_S) * RATE) - 1  # a resume needs no old silence


def test_an_utterance_steps_while_spoken_and_its_final_comes_at_its_end_then_utterance() -> None:
    streamer, decoder = gated([(5.0, 8.0)])
    out = play(streamer, 20.0)
    kinds = [x.kind if isinstance(x, SpeechEvent) else type(x).__name__ for _, x in out]
    assert kinds[0] == EventKind.SPEECH_STARTED and out[0][1].at == 5.0
    stopped = kinds.index(EventKind.SPEECH_STOPPED)
    assert out[stopped][1].at == 8.0 and out[stopped][0] == pytest.approx(8.6)  # heard after 0.6 s of silence
    assert kinds[-1] == EventKind.UTTERANCE
    assert out[-1][0] == pytest.approx(8.6)  # decoded in the same step: no wait for another step
    utterance = out[-1][1]
    assert utterance.at == 8.0 and utterance.text == "w55 w60 w65 w70 w75 w80"
    assert set(kinds[1:stopped]) <= {"str", "Segment"}  # partials (and finals agreed on) while speaking
    assert set(kinds[stopped + 1 :]) <= {"Segment", EventKind.UTTERANCE}  # no partial after the end
    finals = [x for _, x in out if type(x).__name__ == "Segment"]
    assert " ".join(f.text for f in finals) == utterance.text
    assert decoder.decodes <= 5  # about one per second of speech, and the endpoint's
    assert streamer.seconds - streamer._offset <= PREROLL_S + 1e-9  # the window restarted after it


def test_the_endpoint_step_is_urgent_and_decodes_only_up_to_just_after_the_utterance() -> None:
    streamer, decoder = gated([(1.0, 2.0), (3.0, 4.5)], endpoint=0.6)
    out = play(streamer, 2.6)
    assert streamer.urgent is False  # the endpoint was decoded in the chunk that heard it
    utterances = [x for _, x in out if isinstance(x, SpeechEvent) and x.kind is EventKind.UTTERANCE]
    assert [u.text for u in utterances] == ["w15 w20"]
    out = play(streamer, 3.0)
    utterances = [x for _, x in out if isinstance(x, SpeechEvent) and x.kind is EventKind.UTTERANCE]
    assert [u.text for u in utterances] == ["w35 w40 w45"]


def test_an_utterance_that_ended_waits_for_its_final_first_and_marks_the_streamer_urgent() -> None:
    streamer, _ = gated([(0.5, 1.5)], endpoint=0.3)
    for _ in range(18):  # up to 1.8 s: the end is heard, no step taken yet
        streamer.feed(np.zeros(1600, np.float32))
    assert streamer.due and streamer.urgent
    update = streamer.step()
    assert update.partial is None and [e.kind for e in update.events] == [EventKind.UTTERANCE]
    assert not streamer.due and not streamer.urgent


def test_a_pause_decodes_the_speech_at_once_and_an_endpoint_after_it_needs_no_decode() -> None:
    streamer, decoder = gated([(0.0, 1.5)], endpoint=0.6)
    play(streamer, 1.7)  # a step at 1.0 s; the pause is 0.2 s old: not yet
    assert decoder.decodes == 1
    out = play(streamer, 0.1)  # 0.3 s of pause: all the speech is decoded now, without waiting for the next step
    assert decoder.decodes == 2 and [x for _, x in out if isinstance(x, str)] != []
    out = play(streamer, 0.4)  # the endpoint: the final comes from that decode
    assert decoder.decodes == 2
    assert [x.text for _, x in out if isinstance(x, SpeechEvent) and x.kind is EventKind.UTTERANCE] == ["w5 w10 w15"]


def test_silence_after_speech_is_not_handed_to_the_model_nor_its_made_up_words_kept() -> None:
    """A model that says "you" at the end of any window reaching 0.3 s past the speech (as tiny.en does in
    silence): steps decode at most ``PAUSE_S`` past the last speech, and the final keeps no word that begins
    after the utterance's end."""
    utterance = (0.5, 2.0)
    streamer, decoder = gated([utterance], endpoint=0.6)
    heard: list[float] = []
    words_of = decoder.__call__

    def hallucinating(pcm: np.ndarray, prompt: str) -> list[Word]:
        end = streamer._offset + pcm.size / RATE
        heard.append(end)
        words = words_of(pcm, prompt)
        return words + (
            [Word(pcm.size / RATE - 0.1, pcm.size / RATE, " you", 0.3)] if end >= utterance[1] + 0.2 else []
        )

    streamer.decode = hallucinating
    for _ in range(18):  # to 1.8 s, no step taken yet: a worker busy with other sessions
        streamer.feed(np.zeros(1600, np.float32))
    out = play(streamer, 3.0)
    assert max(heard) <= utterance[1] + 0.25 + 1e-6
    (marker,) = [x for _, x in out if isinstance(x, SpeechEvent) and x.kind is EventKind.UTTERANCE]
    assert marker.text == "w10 w15 w20"


def test_utterances_that_end_while_the_worker_is_busy_each_get_their_final_and_marker_in_order() -> None:
    streamer, decoder = gated([(0.5, 1.5), (2.5, 3.5)], endpoint=0.3)
    for _ in range(45):  # 4.5 s fed, no step taken: a worker busy with other sessions
        streamer.feed(np.zeros(1600, np.float32))
    assert [e.kind for e in streamer.events()] == [EventKind.SPEECH_STARTED, EventKind.SPEECH_STOPPED] * 2
    first = streamer.step()
    assert streamer.due and streamer.urgent  # the second one's end waits for its own step, at once
    second = streamer.step()
    assert [(e.text, e.at) for u in (first, second) for e in u.events] == [("w10 w15", 1.5), ("w30 w35", 3.5)]
    assert not streamer.due and decoder.decodes == 2


def test_closing_mid_utterance_ends_it_and_closing_in_silence_decodes_nothing() -> None:
    streamer, decoder = gated([(1.0, 9.0)])
    play(streamer, 3.0)
    streamer.events()
    update = streamer.finish()
    assert [e.kind for e in streamer.events()] == [EventKind.SPEECH_STOPPED]
    assert update.final is not None and [e.kind for e in update.events] == [EventKind.UTTERANCE]
    assert update.events[0].text == "w15 w20 w25 w30"
    quiet, decoder = gated([])
    play(quiet, 3.0)
    assert quiet.finish().final is None and decoder.decodes == 0


def test_a_resumed_stream_puts_the_boundaries_at_stream_time() -> None:
    streamer, _ = gated([(1.0, 2.0)])
    streamer.resume(10 * RATE, [])
    out = play(streamer, 3.0)
    assert [x.at for _, x in out if isinstance(x, SpeechEvent)] == [11.0, 12.0, 12.0]


def test_without_a_detector_nothing_changes() -> None:
    decoder = ScriptedDecoder([(0.0, 5.0)])
    streamer = WindowStreamer(decoder, step_seconds=1.0)
    decoder.streamer = streamer
    out = play(streamer, 5.0)
    assert decoder.decodes == 5 and not any(isinstance(x, SpeechEvent) for _, x in out)
    assert streamer.active and not streamer.urgent


def test_pace_stretches_the_step() -> None:
    streamer, decoder = gated([(0.0, 10.0)])
    streamer.pace(2.5)
    play(streamer, 10.0)
    assert decoder.decodes == 4  # at 2.5, 5.0, 7.5 and 10.0 s of speech


# --- turns and placement -----------------------------------------------------------------------------


def test_an_ended_utterance_goes_first_then_the_longest_waiting() -> None:
    due = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert next_turn(due, 0.5) == JOB
    assert next_turn(due, 0.5, urgent=["c"]) == "c"
    assert next_turn(due, 0.5, urgent=["c", "b"]) == "b"
    assert next_turn(due, None, urgent=["gone"]) == "a"
    assert next_turn({}, None) is None


def test_steps_stretch_evenly_only_when_a_round_of_decodes_outlasts_a_step() -> None:
    assert stretched_step(1.0, [0.3, 0.3]) == 1.0
    assert stretched_step(1.0, []) == 1.0
    assert stretched_step(1.0, [2.5]) == 1.0  # alone: due again as soon as its decode ends
    assert stretched_step(1.0, [5.0, 5.0], most=7.5) == 7.5  # never past half the window
    assert stretched_step(1.0, [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0 * HEADROOM)


def test_a_fake_clock_overloaded_worker_gives_every_session_a_turn_per_round_and_no_backlog() -> None:
    """Four sessions that each take 0.5 s to decode on a worker whose steps are 1 s: with stretched steps each
    decodes once per round, and each decode covers the audio up to that moment (no queue of stale steps)."""
    cost, step, now = 0.5, 1.0, 0.0
    fresh = {s: 0.0 for s in "abcd"}  # seconds of audio each holds since its last decode
    served = {s: [] for s in "abcd"}
    due_since: dict[str, float] = {}
    interval = stretched_step(step, [cost] * 4)
    while now < 60.0:
        for s in fresh:
            if fresh[s] >= interval and s not in due_since:
                due_since[s] = now
        turn = next_turn(due_since, None)
        tick = cost if turn else 0.1
        for s in fresh:
            fresh[s] += tick
        if turn:
            del due_since[turn]
            served[turn].append(fresh[turn])
            fresh[turn] = 0.0
        now += tick
    counts = [len(v) for v in served.values()]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 60 / (interval + cost) - 2
    assert max(x for v in served.values() for x in v) <= interval + 4 * cost + 1e-9  # no stale backlog
    assert all(fresh[s] <= interval + 4 * cost for s in fresh)


def test_smoothed_cost() -> None:
    assert smoothed(0.0, 0.8) == 0.8
    assert smoothed(1.0, 0.0) == pytest.approx(0.7)


def test_heartbeat_turns_give_each_session_its_duty() -> None:
    previous = {"s1": SessionTurn(busy=1.0, step_s=1.0)}
    turns = session_turns(
        previous, {"s1": {"busy": 1.5, "step_s": 2.2}, "s2": {"busy": 0.2, "step_s": 1.0}, "x": 3}, 1.0
    )
    assert turns == {"s1": SessionTurn(1.5, 2.2, 0.5), "s2": SessionTurn(0.2, 1.0, 0.2)}
    assert session_turns(previous, None, 1.0) == {}


def test_sessions_go_by_measured_duty_not_by_count_and_fresh_ones_spread() -> None:
    quiet = WorkerLoad("quiet", sessions=3, jobs=0, duty=0.05)  # three silent sessions
    talking = WorkerLoad("talking", sessions=1, jobs=0, duty=0.6)
    assert session_home([quiet, talking], 4) == "quiet"
    assert session_home([WorkerLoad("a", 0, 0, 0.0, fresh=1), WorkerLoad("b", 0, 0, 0.0)], 4) == "b"
    assert WorkerLoad("a", 2, 0, 0.1, fresh=2).load == pytest.approx(0.1 + 2 * FRESH_DUTY)
    assert session_home([WorkerLoad("full", 4, 0, 0.0)], 4) is None


def test_a_decode_with_more_words_than_the_audio_can_hold_or_a_loop_is_not_taken() -> None:
    from workers.whisper_step import WindowDecoder

    decoder = WindowDecoder(None, {}, 15.0)
    assert not decoder._unheard("Please bring me a cup of coffee and a glass of water.", 3.0)
    assert decoder._unheard("The low world. Today the weather is sunny with a light breeze in the afternoon.", 1.5)
    assert decoder._unheard("with a light breeze, " * 12, 30.0)  # a loop, however long the window


def test_turn_detection_is_checked_at_the_edge() -> None:
    assert parse_turn_detection({}) is None  # a client from before VAD: its sessions get none
    assert parse_turn_detection({"turn_detection": {}}) == {}
    assert parse_turn_detection({"turn_detection": {"vad": True, "endpoint_ms": 500}}) == {
        "vad": True,
        "endpoint_ms": 500,
    }
    for bad in ({"vad": "yes"}, {"endpoint_ms": 50}, {"vad_threshold": 1.5}, {"silence": 1}):
        with pytest.raises(BadRequest, match="turn_detection"):
            parse_turn_detection({"turn_detection": bad})
