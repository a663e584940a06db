"""Live streaming sessions: the real model streamed in 100 ms chunks, and the pool's rules for sessions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from hub import protocol, shm
from hub.audio import to_pcm
from hub.client import AsyncHubClient, StreamSession
from hub.errors import JobTimeout, PoolBusy, WorkerCrashed
from tests.conftest import (
    CLIPS,
    DATA,
    Hub,
    echo_provider,
    reference,
    start_hub,
    wait_for,
    word_error_rate,
)
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(180)

SILENCE = np.zeros(8000, dtype=np.float32)
TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
# for the echo provider's "words" (one per half second, named by its RMS) to differ, as spoken words do
STEPS = np.concatenate([np.full(8000, 0.01 * (i + 1), dtype=np.float32) for i in range(12)])
CHUNK = 1600  # 100 ms


def send_chunks(session, pcm: np.ndarray) -> None:
    """Send in 100 ms chunks, as a microphone would, but as fast as the session takes them."""
    for start in range(0, pcm.size, CHUNK):
        session.send(pcm[start : start + CHUNK])


@pytest.fixture(scope="module")
def whisper_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    provider = {"model": "tiny.en", "device": "cpu", "pool": {"min_size": 2, "max_size": 2, "sessions_per_worker": 3}}
    started = start_hub(tmp_path_factory.mktemp("sessions"), {"whisper": provider})
    yield started
    started.finish()


@pytest.mark.parametrize("use_shm, clips", [(True, CLIPS), (False, CLIPS[:2])])
def test_real_model_streamed_in_chunks(whisper_hub: Hub, use_shm: bool, clips: tuple[str, ...]) -> None:
    clip = np.concatenate([p for c in clips for p in (to_pcm(DATA / f"{c}.wav"), SILENCE)])
    with whisper_hub.client(use_shm=use_shm) as client:
        whole = client.transcribe(clip).text
        inline_before = whisper_hub.status()["hub"]["inline_bytes"]
        session = client.open_stream()
        events = []
        reader = threading.Thread(target=lambda: events.extend(session.results()))
        reader.start()
        for start in range(0, clip.size, CHUNK):  # four times faster than real time
            session.send(clip[start : start + CHUNK])
            time.sleep(CHUNK / 16000 / 4)
        # while the session is open (a loaded machine may not have decoded a step by the last chunk)
        wait_for(lambda: any(e.kind == "partial" for e in list(events)), 30, "a partial before the close")
        partials_before_end = [e for e in list(events) if e.kind == "partial"]
        finals_before_end = [e.text for e in list(events) if e.kind == "final"]
        transcript = session.close()
        reader.join(30)
        assert not reader.is_alive(), "the session's results did not end within 30 s of its close"
    inline = whisper_hub.status()["hub"]["inline_bytes"] - inline_before
    # through the ring, no PCM crosses the supervisor; inline, the whole clip does
    assert inline == (0 if use_shm else clip.nbytes), (use_shm, inline)
    references = " ".join(reference(c) for c in clips)
    assert word_error_rate(references, transcript.text) <= word_error_rate(references, whole) + 0.15, transcript.text
    assert partials_before_end, "partials must arrive while the stream is still going"
    finals = [e.text for e in events if e.kind == "final"]
    assert finals[: len(finals_before_end)] == finals_before_end  # finals are never revised
    assert " ".join(finals) == transcript.text and [s.text for s in transcript.segments] == finals
    assert transcript.duration == pytest.approx(clip.size / 16000, abs=0.01)


def test_more_sessions_than_workers_each_get_their_own_clips_text(whisper_hub: Hub) -> None:
    """Six live sessions on two whisper workers (three each, taking turns), fed together at twice the speed
    of speech: every stream's final text is its own clip's."""
    clips = [CLIPS[i % len(CLIPS)] for i in range(6)]
    pcms = [np.concatenate([to_pcm(DATA / f"{c}.wav"), SILENCE]) for c in clips]
    with whisper_hub.client() as client:
        sessions = [client.open_stream(language="en") for _ in clips]
        assert len({s.worker for s in sessions}) == 2
        for start in range(0, max(p.size for p in pcms), CHUNK):
            for session, pcm in zip(sessions, pcms, strict=False):
                if start < pcm.size:
                    session.send(pcm[start : start + CHUNK])
            time.sleep(CHUNK / 16000 / 2)
        texts = [session.close().text for session in sessions]
    for clip, text in zip(clips, texts, strict=False):
        assert word_error_rate(reference(clip), text) <= 0.2, (clip, text)


def test_async_session(whisper_hub: Hub) -> None:
    async def main() -> None:
        async with AsyncHubClient(whisper_hub.endpoint, timeout=60) as client:
            async with await client.open_stream(language="en") as session:
                pcm = to_pcm(DATA / "stella.wav")
                for start in range(0, pcm.size, CHUNK):
                    await session.send(pcm[start : start + CHUNK])
            finals = [e async for e in session.results() if e.kind == "final"]
            assert word_error_rate(reference("stella"), session.transcript.text) <= 0.15
            assert " ".join(e.text for e in finals) == session.transcript.text

    asyncio.run(main())


def test_cli_stream_realtime_paces_its_chunks_at_the_speed_of_speech(
    whisper_hub: Hub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pacing itself is timed: when each chunk was handed to the session, not the whole run."""
    from hub.client.__main__ import main as cli

    sent: list[tuple[float, int]] = []
    send = StreamSession.send

    def timed(self: StreamSession, chunk: np.ndarray, sample_rate: int | None = None) -> None:
        sent.append((time.monotonic(), len(chunk)))
        send(self, chunk, sample_rate)

    monkeypatch.setattr(StreamSession, "send", timed)
    assert cli(["--endpoint", whisper_hub.endpoint, "stream", str(DATA / "coffee.wav"), "--realtime"]) == 0
    assert [n for _, n in sent[:-1]] == [CHUNK] * (len(sent) - 1) and sum(n for _, n in sent) == to_pcm(
        DATA / "coffee.wav"
    ).size
    first = sent[0][0]
    early = [i for i, (at, _) in enumerate(sent) if at - first < i * CHUNK / 16000 - 0.01]
    assert not early, f"chunks {early} were sent before their time in the audio"
    assert word_error_rate(reference("coffee"), " ".join(capsys.readouterr().out.split())) <= 0.15


def test_sessions_past_max_sessions_are_refused_while_jobs_run(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, max_sessions=1)})
    with hub.client() as client:
        with client.open_stream() as first:
            first.send(TONE)
            started = time.monotonic()
            with pytest.raises(PoolBusy, match="max_sessions=1"):
                client.open_stream()
            assert time.monotonic() - started < 10, "not refused at once: it waited towards the 30 s timeout"
            assert client.transcribe(TONE).text == echo_text(TONE)  # one-shot jobs keep their worker
            assert hub.status()["providers"]["echo"]["sessions"] == 1
        assert first.transcript.text  # closed cleanly on leaving the block
        with client.open_stream() as again:  # the lease was returned
            again.send(TONE)


def test_sessions_grow_the_pool_by_their_load(hub_factory) -> None:
    """Two sessions a worker: three sessions need two workers, plus one kept free for one-shot jobs."""
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=3, sessions_per_worker=2)})
    with hub.client() as client:
        sessions = [client.open_stream() for _ in range(3)]
        wait_for(lambda: hub.status()["providers"]["echo"]["size"] == 3, what="the pool grown to 3 by its sessions")
        assert client.transcribe(TONE, timeout=20).text == echo_text(TONE)
        for session in sessions:
            session.close()


def test_one_session_a_worker_waits_for_the_pool_to_grow(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=3, sessions_per_worker=1, max_sessions=2)})
    with hub.client() as client:
        a = client.open_stream()
        b = client.open_stream()  # waits for the pool to grow
        assert a.worker != b.worker and hub.status()["providers"]["echo"]["size"] >= 2
        with pytest.raises(PoolBusy, match="max_sessions=2"):
            client.open_stream()
        assert client.transcribe(TONE, timeout=20).text == echo_text(TONE)
        a.close()
        b.close()


def test_sessions_beyond_the_worker_count_share_workers_by_load(hub_factory) -> None:
    """Six sessions on two workers of three sessions each: placed by least load, each with its own text;
    the seventh is POOL_BUSY at once, since every worker the pool may have is full."""
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2, sessions_per_worker=3)})
    clips = [STEPS * (1 + i / 10) for i in range(6)]
    with hub.client() as client:
        alone = []
        for clip in clips[:2]:
            with client.open_stream() as session:
                send_chunks(session, clip)
            alone.append(session.transcript.text)
        sessions = [client.open_stream() for _ in clips]
        loads = {w["id"]: w["sessions"] for w in hub.status()["providers"]["echo"]["workers"]}
        assert sorted(loads.values()) == [3, 3], loads
        started = time.monotonic()
        with pytest.raises(PoolBusy, match="max_sessions=6"):
            client.open_stream()
        assert time.monotonic() - started < 10, "not refused at once: it waited towards the 30 s timeout"
        for start in range(0, STEPS.size, CHUNK):  # interleaved, as live streams are
            for session, clip in zip(sessions, clips, strict=False):
                session.send(clip[start : start + CHUNK])
        texts = [session.close().text for session in sessions]
    assert texts[:2] == alone and len(set(texts)) == 6, texts


def test_one_shot_jobs_go_to_the_worker_without_sessions(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})
    with hub.client() as client:
        with client.open_stream() as session:
            session.send(TONE)
            workers = {client.transcribe(TONE).worker for _ in range(4)}
            assert workers and session.worker not in workers, (session.worker, workers)


def test_a_single_instance_still_serves_one_thing_at_a_time(hub_factory) -> None:
    """pool.enabled: false: the session holds the one worker; a one-shot job waits for it to close."""
    hub = hub_factory({"echo": {"type": "echo", "pool": {"enabled": False}}})
    with hub.client() as client:
        session = client.open_stream()
        with pytest.raises(PoolBusy, match="max_sessions=1"):
            client.open_stream()
        done: list = []
        job = threading.Thread(target=lambda: done.append(client.transcribe(TONE, timeout=20)))
        job.start()
        wait_for(
            lambda: hub.status()["providers"]["echo"]["queue_depth"] == 1, what="the job queued behind the session"
        )
        assert not done
        session.close()
        job.join(20)
        assert done and done[0].text == echo_text(TONE)


def test_an_idle_session_is_closed_with_its_reason(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(session_idle_timeout=1.0)})
    with hub.client() as client:
        session = client.open_stream()
        send_chunks(session, STEPS)
        events = list(session.results())  # ends when the hub closes the session
        assert session.transcript.extra["closed_reason"].startswith("no audio for")
        assert [e.kind for e in events if e.kind == "final"]
        with pytest.raises(JobTimeout, match="session_idle_timeout"):
            session.send(TONE)
        assert session.close().text == session.transcript.text


def test_killing_a_sessions_worker_fails_it_and_the_pool_recovers(hub_factory) -> None:
    """With pool.retry_on_crash 0 a session does not move to another worker (tests/integration/test_resume.py: it does)."""
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=2, max_sessions=1, retry_on_crash=0)})
    prefix = shm.hub_prefix(hub.status()["hub"]["id"])
    with hub.client() as client:
        session = client.open_stream()
        events = session.results()
        half = STEPS.size // 2  # two decodes, so that some words are final before the kill
        send_chunks(session, STEPS[:half])
        seen = [next(events)]
        send_chunks(session, STEPS[half:])
        while seen[-1].kind != "final":
            seen.append(next(events))
        pid = next(w["pid"] for w in hub.status()["providers"]["echo"]["workers"] if w["id"] == session.worker)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashed) as crashed:
            for event in events:  # finals already on their way when the worker died
                seen.append(event)
        confirmed = " ".join(e.text for e in seen if e.kind == "final")
        assert confirmed and crashed.value.transcript.text == confirmed  # the text confirmed before the crash is kept
        with pytest.raises(WorkerCrashed):
            session.close()
        assert not shm.list_segments(prefix)
        assert client.transcribe(TONE, timeout=20).text == echo_text(TONE)
        with client.open_stream(timeout=20) as reopened:
            reopened.send(TONE)


def test_async_session_with_a_reader_task_closes_at_once(hub_factory) -> None:
    """The sender and the reader as separate tasks, as the API guide shows: close() must not wait for a
    message the reader already took."""
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_sessions=1)})

    async def main() -> None:
        async with AsyncHubClient(hub.endpoint, timeout=30) as client:
            session = await client.open_stream()
            events: list = []

            async def read() -> None:
                async for event in session.results():
                    events.append(event)

            reader = asyncio.create_task(read())
            for start in range(0, STEPS.size, CHUNK):
                await session.send(STEPS[start : start + CHUNK])
            started = time.monotonic()
            transcript = await session.close()
            assert time.monotonic() - started < 5.0
            await asyncio.wait_for(reader, 5)
            assert transcript.text == " ".join(e.text for e in events if e.kind == "final")

    asyncio.run(main())


def test_a_session_open_past_max_session_seconds_is_closed_with_its_reason(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(max_session_seconds=1.0)})
    with hub.client() as client:
        session = client.open_stream()
        send_chunks(session, STEPS[:16000])
        finals = [e.text for e in session.results() if e.kind == "final"]  # ends when the hub closes it
        assert session.transcript.extra["closed_reason"] == "open longer than pool.max_session_seconds=1"
        assert session.transcript.text == " ".join(finals) == "a10 a20"
        with pytest.raises(JobTimeout, match="max_session_seconds"):
            session.send(TONE)


def test_stream_step_ms_from_the_config_sets_the_decode_pace(hub_factory) -> None:
    """With step_ms 500 the worker decodes after every half second of audio: after each 500 ms sent, one more
    partial must come (with the default 1000 ms, every other one would never come)."""
    hub = hub_factory({"echo": {**echo_provider(), "stream": {"step_ms": 500, "window_seconds": 1.0}}})
    events: list = []
    with hub.client() as client:
        session = client.open_stream()
        reader = threading.Thread(target=lambda: events.extend(session.results()))
        reader.start()
        for step in range(1, 9):
            send_chunks(session, STEPS[(step - 1) * 8000 : step * 8000])
            wait_for(
                lambda step=step: sum(e.kind == "partial" for e in list(events)) >= step,
                what=f"the decode after {step * 0.5} s",
            )
        transcript = session.close()
        reader.join(30)
    assert transcript.text == " ".join(f"a{10 * (i + 1)}" for i in range(8)), transcript.text
    # each event says how much audio its text covers: the step-th decode had read step half-seconds
    assert [e.heard for e in events if e.kind == "partial"][:8] == [0.5 * step for step in range(1, 9)]


def test_send_blocks_while_the_worker_is_a_ring_behind_then_times_out(hub_factory) -> None:
    """The ring holds 30 s of audio; a worker that decodes slowly (echo's sleep) falls behind a sender that
    sends as fast as it can: the send past 30 s blocks, and after the session's timeout raises JobTimeout."""
    hub = hub_factory({"echo": echo_provider()}, hub={"drain_timeout": 1})
    with hub.client() as client:
        session = client.open_stream(sleep=3.0, timeout=1.0)
        second = np.full(16000, 0.05, dtype=np.float32)
        for _ in range(30):
            session.send(second)  # fits in the ring
        started = time.monotonic()
        with pytest.raises(JobTimeout, match="fell more than 30 s of audio behind"):
            session.send(second)
        assert time.monotonic() - started >= 0.9, "the send must wait for the worker before giving up"


def test_stream_window_seconds_from_the_config_reaches_the_worker(hub_factory) -> None:
    """A 2 s window trims the audio the model re-decodes, which changes whisper's finals here (with the
    default 15 s window the same audio gives "bring me a cup | of coffee and a | glass of water."). The
    hub's session, stepped where the adapter steps, must give exactly the adapter's own answer for 2 s."""
    from hub.protocol import WorkerSpec
    from workers.engine import StreamSettings
    from workers.whisper import WhisperEngine

    settings = {"step_ms": 1000, "window_seconds": 2.0, "vad": False}  # a step (and a partial) every second
    provider = {
        "model": "tiny.en",
        "device": "cpu",
        "cpu_threads": 1,
        "stream": settings,
        "pool": {"min_size": 1, "max_size": 1, "max_sessions": 1},
    }
    hub = hub_factory({"whisper": provider})
    pcm = np.concatenate([p for c in ("hello", "coffee") for p in (to_pcm(DATA / f"{c}.wav"), SILENCE)])
    spec = WorkerSpec(
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
    streamer = WhisperEngine(spec).open_stream({}, StreamSettings(**settings))
    expected, due_after = [], []
    for index, start in enumerate(range(0, pcm.size, CHUNK)):
        streamer.feed(pcm[start : start + CHUNK])
        if streamer.due:
            update = streamer.step()
            due_after.append(index)
            expected += [update.final.text] if update.final else []
    last = streamer.finish().final
    expected += [last.text] if last else []
    events: list = []
    with hub.client() as client:
        session = client.open_stream()
        reader = threading.Thread(target=lambda: events.extend(session.results()))
        reader.start()
        for index, start in enumerate(range(0, pcm.size, CHUNK)):
            session.send(pcm[start : start + CHUNK])
            if index in due_after:  # let the worker decode here, where the adapter did
                step = due_after.index(index) + 1
                wait_for(
                    lambda step=step: sum(e.kind == "partial" for e in list(events)) >= step,
                    timeout=60,
                    what=f"step {step}",
                )
        transcript = session.close()
        reader.join(30)
    assert [s.text for s in transcript.segments] == expected


@pytest.mark.parametrize("use_shm", [True, False])
def test_48k_chunks_of_127_samples_reach_the_worker_as_a_whole_file_resample(hub_factory, use_shm: bool) -> None:
    """One resampler per session: the worker sees the length and the samples of a whole-file resample
    (the echo words name each half second's RMS), not 0.8 % more audio with a seam at every chunk."""
    from hub.audio import resample

    hub = hub_factory({"echo": echo_provider()})
    pcm48 = np.repeat(STEPS[::3], 9)[: 3 * 48000 + 50]  # 3 s of 48 kHz steps
    whole = resample(pcm48, 48000)
    with hub.client(use_shm=use_shm) as client:
        with client.open_stream() as reference_session:
            send_chunks(reference_session, whole)
        with client.open_stream() as session:
            for start in range(0, pcm48.size, 127):
                session.send(pcm48[start : start + 127], sample_rate=48000)
    assert round(session.transcript.duration * 16000) == whole.size
    assert session.transcript.text == reference_session.transcript.text and session.transcript.text


def test_a_final_transcript_larger_than_a_request_may_be_arrives_whole(hub_factory) -> None:
    """A long session's answer (every final, with its words) passes the 256 KB a client's request may hold:
    the worker's answer to the supervisor and the supervisor's to the client carry it whole."""
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1)})
    minutes = np.tile(STEPS, 375)  # 37.5 minutes of "speech", a word every half second
    with hub.client(timeout=120) as client:
        with client.open_stream() as session:
            for start in range(0, minutes.size, 16000 * 30):
                session.send(minutes[start : start + 16000 * 30])
            transcript = session.close()
        finals = [event.segment for event in session.results() if event.kind == "final"]
    body = len(json.dumps(transcript.to_dict()))
    assert body > protocol.MAX_BODY_BYTES, f"the transcript is only {body} bytes: the test proves nothing"
    assert transcript.duration == pytest.approx(minutes.size / 16000, abs=0.01)
    assert list(transcript.segments) == finals and len(transcript.text.split()) == minutes.size // 8000
    assert hub.status()["hub"]["malformed_messages"] == 0
