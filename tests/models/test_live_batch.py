"""Live steps of several sessions in one forward pass on the real tiny.en model: the words they get together
are the words they get alone, with and without VAD."""

from __future__ import annotations

import numpy as np
import pytest

from hub.audio import to_pcm
from tests.conftest import CLIPS, DATA, reference, word_error_rate
from tests.models.test_live_vad import CHUNK, engine, silence  # noqa: F401  (the module's engine fixture)
from workers.engine import StreamSettings
from workers.streaming import StreamUpdate, WindowStreamer, step_together
from workers.whisper import WhisperEngine

pytestmark = pytest.mark.timeout(300)


def _texts(updates: list[list[StreamUpdate]]) -> list[str]:
    return [" ".join(u.final.text for u in stream if u.final is not None) for stream in updates]


@pytest.mark.parametrize("vad", [False, True])
def test_sessions_stepped_together_get_the_words_they_get_alone(engine: WhisperEngine, vad: bool) -> None:  # noqa: F811
    names = ("coffee", "weather")  # of a length, so that their steps fall due together
    pcms = [np.concatenate([silence(0.3), to_pcm(DATA / f"{n}.wav"), silence(1.5)]) for n in names]
    length = max(p.size for p in pcms)
    pcms = [np.concatenate([p, silence((length - p.size) / 16000)]) for p in pcms]
    settings = StreamSettings(vad=vad)
    together = [engine.open_stream({}, settings) for _ in names]
    alone = [engine.open_stream({}, settings) for _ in names]
    assert all(isinstance(s, WindowStreamer) and s.batch == together[0].batch for s in together)  # one shared decoder
    got_together: list[list[StreamUpdate]] = [[] for _ in names]
    got_alone: list[list[StreamUpdate]] = [[] for _ in names]
    passes = []
    for start in range(0, length, CHUNK):
        for streamers in (together, alone):
            for streamer, pcm in zip(streamers, pcms, strict=True):
                streamer.feed(pcm[start : start + CHUNK])
        due = [i for i, s in enumerate(together) if s.due]
        if due:
            passes.append(len(due))
            for i, update in zip(due, step_together([together[i] for i in due]), strict=True):
                assert isinstance(update, StreamUpdate), update
                got_together[i].append(update)
        for i, streamer in enumerate(alone):
            if streamer.due:
                got_alone[i].append(streamer.step())
    for streamers, got in ((together, got_together), (alone, got_alone)):
        for streamer, updates in zip(streamers, got, strict=True):
            updates.append(streamer.finish())
    texts, solo = _texts(got_together), _texts(got_alone)
    assert max(passes) >= 2  # steps shared a pass (with VAD, pauses put the streams out of step at times)
    for name, text, own in zip(names, texts, solo, strict=True):
        assert text == own, (name, text, own)
        assert word_error_rate(reference(name), text) <= 0.2, (name, text)


def test_windows_with_prompts_of_any_length_are_heard_in_one_call(engine: WhisperEngine) -> None:  # noqa: F811
    """Sessions' prompts (their confirmed text) differ in length, which one CTranslate2 generate does not take:
    the windows with a prompt share a pass with their prompts cut to the shortest, the one without decodes as
    it does alone, and every window gets its own clip's words."""
    streamer = engine.open_stream({}, StreamSettings())
    assert isinstance(streamer, WindowStreamer) and streamer.batch is not None
    names = CLIPS[:3]
    pcms = [to_pcm(DATA / f"{n}.wav") for n in names]
    prompts = ["Good morning, everyone. Thank you for coming to the meeting today.", "Right.", ""]
    heard = streamer.batch(list(zip(pcms, prompts, strict=True)))
    for name, words in zip(names, heard, strict=True):
        assert not isinstance(words, Exception), words
        assert word_error_rate(reference(name), "".join(w.word for w in words)) <= 0.2, (name, words)
    assert heard[2] == streamer.decode(pcms[2], "")  # no prompt: as alone
