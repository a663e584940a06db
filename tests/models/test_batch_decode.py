"""The real adapters batched: the same words batched as one by one, in one forward pass.

whisper runs the real tiny.en model on the committed clips (greedy and beam 5, with and without word
timings); FunASR a tiny offline Paraformer (as in ``tests/models/test_funasr.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from hub.audio import to_pcm
from hub.protocol import WorkerSpec
from tests.conftest import DATA
from workers.engine import DecodeItem, EngineResult

CLIPS = ("coffee", "hello", "stella", "weather")


def _spec(kind: str, model: str = "", **extra: Any) -> WorkerSpec:
    return WorkerSpec(
        id=f"{kind}-1",
        provider=kind,
        type=kind,
        model=model,
        device="cpu",
        compute_type="auto",
        cpu_threads=1,
        backend="",
        shm_prefix="",
        heartbeat_interval=1.0,
        options={},
        **extra,
    )


def _item(pcm: np.ndarray, **options: Any) -> DecodeItem:
    return DecodeItem(pcm, options)


# --- whisper: the same words batched and one by one ----------------------------------


@pytest.fixture(scope="module")
def whisper() -> Iterator[Any]:
    from workers.whisper import WhisperEngine

    engine = WhisperEngine(_spec("whisper", "tiny.en"))
    calls: list[tuple[int, ...]] = []
    encode = engine._model.encode
    engine._model.encode = lambda features: (calls.append(features.shape), encode(features))[1]
    engine.encodes = calls
    yield engine


@pytest.mark.parametrize("options", [{"beam_size": 1}, {"beam_size": 5}, {"beam_size": 5, "word_timestamps": True}])
def test_whisper_batched_gives_the_words_and_timings_of_one_by_one_in_one_encode(
    whisper: Any, options: dict[str, Any]
) -> None:
    clips = [to_pcm(DATA / f"{name}.wav") for name in CLIPS]
    alone = [whisper.transcribe(pcm, dict(options), lambda s: None) for pcm in clips]
    whisper.encodes.clear()
    batched = whisper.transcribe_batch([_item(pcm, **options) for pcm in clips])
    assert whisper.encodes[0] == (len(CLIPS), 80, 3000)  # one encode over the four 30 s windows
    assert len(whisper.encodes) == 1, f"{len(whisper.encodes) - 1} clip(s) left the batch"
    for one, many in zip(alone, batched, strict=True):
        assert isinstance(many, EngineResult)
        assert many.text == one.text and many.segments == one.segments  # words and their timings included


def test_whisper_splits_a_batch_by_options_and_decodes_a_long_recording_alone(whisper: Any) -> None:
    short = to_pcm(DATA / "hello.wav")
    pause = np.zeros(8000, dtype=np.float32)  # clips apart decode fast; run together, tiny.en falls back to sampling
    long = np.concatenate([p for name in (*CLIPS, *CLIPS) for p in (to_pcm(DATA / f"{name}.wav"), pause)])  # 31 s
    assert long.size > 30 * 16000
    whisper.encodes.clear()
    outcomes = whisper.transcribe_batch([_item(short), _item(long), _item(short, beam_size=1), _item(short)])
    assert all(isinstance(o, EngineResult) for o in outcomes)
    assert whisper.encodes[0] == (2, 80, 3000)  # the two short default-option jobs together
    assert outcomes[0].text == outcomes[3].text == whisper.transcribe(short, {}, lambda s: None).text
    # the long recording went through transcribe alone: its windows one encode each (temperature fallback may
    # sample there, so its text is not compared; its length and the single-window encodes are)
    assert outcomes[1].text and outcomes[1].duration == pytest.approx(long.size / 16000)
    assert len(whisper.encodes) >= 3 and all(shape[0] == 80 or shape[0] == 1 for shape in whisper.encodes[1:])


def test_whisper_fails_a_job_with_bad_audio_alone(whisper: Any) -> None:
    good = to_pcm(DATA / "hello.wav")
    outcomes = whisper.transcribe_batch([_item(good), _item(good, temperature=[0.0, 0.2], beam_size=0)])
    assert isinstance(outcomes[0], EngineResult) and outcomes[0].text == "Hello world."
    assert isinstance(outcomes[1], Exception)
