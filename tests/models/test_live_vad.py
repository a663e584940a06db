"""VAD-gated live sessions on the real tiny.en model: decodes saved on silence, the words kept, the event
contract through a real hub, the final soon after an utterance ends, and an overloaded worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from hub.audio import to_pcm
from hub.client import StreamEvent
from hub.protocol import WorkerSpec
from tests.conftest import DATA, Hub, reference, start_hub, word_error_rate
from workers.engine import StreamSettings
from workers.whisper import WhisperEngine

pytestmark = pytest.mark.timeout(300)

RATE = 16000
CHUNK = 1600  # 100 ms
SPOKEN = ("coffee", "stella", "weather")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.float32)


def padded(gaps: tuple[float, ...], names: tuple[str, ...] = SPOKEN) -> np.ndarray:
    """``gaps[0]`` s of silence, then each clip followed by the next gap."""
    parts = [silence(gaps[0])]
    for name, gap in zip(names, gaps[1:], strict=False):
        parts += [to_pcm(DATA / f"{name}.wav"), silence(gap)]
    return np.concatenate(parts)


def spec() -> WorkerSpec:
    return WorkerSpec(
        id="whisper-1",
        provider="whisper",
        type="whisper",
        model="tiny.en",
        device="cpu",
        compute_type="int8",
        cpu_threads=1,
        backend="ipc:///nowhere",
        shm_prefix="asrhub_x_",
        heartbeat_interval=1.0,
        options={},
        allow_download=False,
    )


@pytest.fixture(scope="module")
def engine() -> WhisperEngine:
    return WhisperEngine(spec())


def stream_through(engine: WhisperEngine, pcm: np.ndarray, vad: bool) -> tuple[str, int]:
    """The adapter's streamer fed 100 ms chunks, stepped whenever due: its text and how many decodes it made."""
    streamer = engine.open_stream({}, StreamSettings(vad=vad))
    decodes = 0
    decode = streamer.decode

    def counted(window: np.ndarray, prompt: str):  # type: ignore[no-untyped-def]
        nonlocal decodes
        decodes += 1
        return decode(window, prompt)

    streamer.decode = counted
    finals = []
    for start in range(0, pcm.size, CHUNK):
        streamer.feed(pcm[start : start + CHUNK])
        if streamer.due:
            finals.append(streamer.step().final)
    finals.append(streamer.finish().final)
    return " ".join(f.text for f in finals if f is not None), decodes


def test_vad_decodes_at_most_40_percent_of_a_mostly_silent_session_with_the_same_words(engine: WhisperEngine) -> None:
    spoken = ("coffee", "weather")
    pcm = padded((3.0, 7.0, 8.0), spoken)
    speech = sum(to_pcm(DATA / f"{n}.wav").size for n in spoken)
    assert 1 - speech / pcm.size >= 0.7  # 70 % silence
    gated, gated_decodes = stream_through(engine, pcm, vad=True)
    plain, plain_decodes = stream_through(engine, pcm, vad=False)
    assert gated_decodes <= 0.4 * plain_decodes, (gated_decodes, plain_decodes)
    said = " ".join(reference(n) for n in spoken)
    # the words said, as well as without VAD, and nothing made up in the silences (without VAD, tiny.en hears
    # "Thank you." in them here): every word of the gated text was said, in order
    assert word_error_rate(said, gated) <= min(0.05, word_error_rate(said, plain)), (said, gated, plain)
    said_words = iter(normalized(said))
    assert all(word in said_words for word in normalized(gated)), (gated, said)


def normalized(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace() or c == "'").split()


VAD_HUB_STEP_S = 0.5


@pytest.fixture(scope="module")
def vad_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    provider = {
        "model": "tiny.en",
        "device": "cpu",
        "cpu_threads": 1,
        # a step every 0.5 s: four talking sessions then need about twice the decoding one worker can do
        # (a decode of ~0.25 s each), which the overloaded-worker test needs
        "stream": {"vad": True, "step_ms": round(VAD_HUB_STEP_S * 1000)},
        "pool": {"min_size": 1, "max_size": 1, "sessions_per_worker": 4},
    }
    started = start_hub(tmp_path_factory.mktemp("vad"), {"whisper": provider})
    yield started
    assert started.stop() == 0


def play(hub: Hub, pcm: np.ndarray, **open_kwargs: object) -> tuple[list[tuple[float, StreamEvent]], float, str]:
    """Stream ``pcm`` at real time; every event with the playback time it arrived at, the seconds one of its
    decodes took on the worker (on average), and the transcript's text."""
    events: list[tuple[float, StreamEvent]] = []
    with hub.client(timeout=120) as client:
        session = client.open_stream(**open_kwargs)
        started = time.monotonic()
        reader = threading.Thread(
            target=lambda: events.extend((time.monotonic() - started, e) for e in session.results())
        )
        reader.start()
        for offset in range(0, pcm.size, CHUNK):
            time.sleep(max(0.0, started + offset / RATE - time.monotonic()))
            session.send(pcm[offset : offset + CHUNK])
        transcript = session.close()
        reader.join(30)
    assert not reader.is_alive(), "the session's results did not end within 30 s of its close"
    return events, transcript.inference_ms / 1000 / max(1, int(transcript.extra.get("decodes", 1))), transcript.text


def utterances(events: list[tuple[float, StreamEvent]]) -> list[list[tuple[float, StreamEvent]]]:
    """The events cut after each ``utterance`` marker."""
    cut, current = [], []
    for item in events:
        current.append(item)
        if item[1].kind == "utterance":
            cut.append(current)
            current = []
    assert not [e for _, e in current if e.kind != "partial"], f"events after the last utterance: {current}"
    return cut


IDLE_DECODE_S = 0.5  # the bounds' floor for a decode: a step's decode takes 0.25-0.5 s on an idle core
UTTERANCE_PERIOD_S = 5.0  # the overloaded test's clips with their 1.5 s gaps: an utterance ends every 5-6 s


def decode_seconds(engine: WhisperEngine) -> float:
    """What one step's decode costs on this machine now (the median of three)."""
    streamer = engine.open_stream({}, StreamSettings())
    window = padded((0.2, 0.2), ("coffee",))
    times = []
    for _ in range(3):
        started = time.perf_counter()
        streamer.decode(window, "")
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def test_the_event_contract_and_a_final_within_a_second_of_the_utterance_end(
    vad_hub: Hub, engine: WhisperEngine
) -> None:
    """On an idle worker the final comes within 1 s of the utterance's end. The machine running the tests is
    shared, so the bound grows by what each decode costs here beyond an idle core's (measured before the session
    and on the worker during it, whichever is slower), for the three decodes that may stand between an
    utterance's end and its final (one under way, the one at the pause, the end's own when the pause's did not
    hear it all)."""
    before = decode_seconds(engine)
    pcm = padded((1.5, 3.0, 3.0), ("coffee", "weather"))
    events, during, text = play(vad_hub, pcm)
    slower = max(0.0, max(before, during) - IDLE_DECODE_S)  # the load may change while the session plays
    parts = utterances(events)
    assert len(parts) == 2
    for part, name in zip(parts, ("coffee", "weather"), strict=False):
        kinds = [e.kind for _, e in part]
        assert kinds[0] == "speech_started" and kinds.count("speech_started") == 1
        stopped = kinds.index("speech_stopped")
        assert set(kinds[1:stopped]) <= {"partial", "final"}, kinds
        assert set(kinds[stopped + 1 : -1]) <= {"final"}, kinds  # after the end: its finals, then the marker
        marker_time, marker = part[-1]
        finals = " ".join(e.text for _, e in part if e.kind == "final")
        assert marker.text == finals and word_error_rate(reference(name), marker.text) <= 0.15, (marker.text, name)
        start, end = part[0][1].at, part[stopped][1].at
        assert start < end <= marker.at + 1e-6 and marker.at == end
        late = marker_time - end
        assert late <= 1.0 + 3 * slower, (
            f"the final came {late:.2f} s after the utterance ended ({slower:.2f} s slower decodes)"
        )
    assert text == " ".join(m[-1][1].text for m in parts)


def test_a_session_can_turn_vad_off_and_then_nothing_new_is_sent(vad_hub: Hub) -> None:
    pcm = padded((0.5, 1.0), ("coffee",))
    events, _, text = play(vad_hub, pcm, turn_detection={"vad": False})
    assert {e.kind for _, e in events} <= {"partial", "final"}
    assert word_error_rate(reference("coffee"), text) <= 0.15


def test_an_overloaded_worker_keeps_producing_finals_with_no_stale_backlog(vad_hub: Hub, engine: WhisperEngine) -> None:
    """Four sessions talking at once on one one-thread worker, each two decodes of ~0.25 s a second: more than
    it can do. Their steps stretch evenly; every utterance still gets its final within the decodes that can stand
    before it (one under way and the four sessions' ends, which come together here, and one more for the spread
    of decode times on a loaded machine: the bound takes their mean), and partials never lag further behind the
    audio than a stretched round and a decode: the lag does not grow with the stream."""
    pcm = padded((0.3, 1.5, 1.5, 2.0))
    cost = decode_seconds(engine)
    if 4 * cost > 0.8 * UTTERANCE_PERIOD_S:
        pytest.skip(
            f"a decode takes {cost:.1f} s on this machine now (0.5 s on an idle core): the four sessions' utterance "
            f"ends alone need more decoding than real time allows, so no scheduler avoids a backlog"
        )
    results: list[tuple[list[tuple[float, StreamEvent]], float, str]] = [([], 0.0, "")] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, play(vad_hub, pcm))) for i in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.25)
    status_seen = []
    while any(t.is_alive() for t in threads):
        workers = vad_hub.status()["providers"]["whisper"]["workers"]
        status_seen += [t for w in workers for t in w.get("session_turns", [])]
        time.sleep(1.0)
    for thread in threads:
        thread.join()
    assert max(t["step_s"] for t in status_seen) > VAD_HUB_STEP_S, "the worker never stretched its steps"
    said = " ".join(reference(n) for n in SPOKEN)
    decode = max(IDLE_DECODE_S, *(d for _, d, _ in results))  # what a decode cost on the worker, this run
    for events, _, text in results:
        parts = utterances(events)
        assert len(parts) == 3
        for part in parts:
            marker_time, marker = part[-1]
            late = marker_time - marker.at
            assert late <= 1.0 + 6 * decode, f"a final {late:.1f} s after its utterance (a decode: {decode:.2f} s)"
        lags = [t - e.heard for t, e in events if e.kind == "partial"]
        assert max(lags, default=0.0) <= 1.0 + 6 * decode, f"partials fell behind: {max(lags):.1f} s"
        assert word_error_rate(said, text) <= 0.2, text
