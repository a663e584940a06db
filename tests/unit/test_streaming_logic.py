"""The local-agreement window, with a scripted decoder standing in for the model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from hub.results import Word
from workers.echo import echo_words
from workers.streaming import StreamUpdate, Window, WindowStreamer, step_together

SENTENCE = "the quick brown fox jumps over the lazy dog and runs far away into the green hills".split()
WORD_SECONDS = 0.5


def scripted(unstable_tail: bool = True, prompts: list[str] | None = None):
    """Words of SENTENCE every 0.5 s of stream time; while the stream goes on, the last word heard is garbled,
    as a model's often is when a word is cut off."""
    state = {"offset": 0.0, "ended": False}

    def decode(pcm: np.ndarray, prompt: str) -> list[Word]:
        if prompts is not None:
            prompts.append(prompt)
        offset = state["offset"]
        length = pcm.size / 16000
        words = []
        for i, word in enumerate(SENTENCE):
            start, end = i * WORD_SECONDS - offset, (i + 1) * WORD_SECONDS - offset
            if start < 0 or end > length:
                continue
            words.append(Word(start, end, " " + word, 0.9))
        if unstable_tail and words and not state["ended"]:
            last = words[-1]
            words[-1] = Word(last.start, last.end, f" {last.word.strip()}{int(length * 10)}", 0.4)
        return words

    return decode, state


def run(streamer: WindowStreamer, state: dict, seconds: float, chunk: float = 0.1) -> tuple[list, list[str]]:
    finals, partials = [], []
    audio = np.zeros(int(chunk * 16000), dtype=np.float32)
    for _ in range(int(seconds / chunk)):
        streamer.feed(audio)
        if streamer.due:
            state["offset"] = streamer._offset
            update = streamer.step()
            if update.final:
                finals.append(update.final)
            partials.append(update.partial)
    state["offset"], state["ended"] = streamer._offset, True
    last = streamer.finish()
    if last.final:
        finals.append(last.final)
    return finals, partials


def test_words_become_final_once_two_decodes_agree_and_are_never_revised() -> None:
    decode, state = scripted()
    streamer = WindowStreamer(decode, step_seconds=1.0, window_seconds=100.0)
    finals, partials = run(streamer, state, seconds=len(SENTENCE) * WORD_SECONDS)
    text = " ".join(f.text for f in finals)
    assert text.split() == SENTENCE  # everything, once, in order; garbled tails never committed
    assert len(finals) >= 3 and any(partials)
    assert [f.start for f in finals] == sorted(f.start for f in finals)
    assert all(a.end <= b.start + 1e-6 for a, b in zip(finals, finals[1:], strict=False))


def test_the_window_is_trimmed_and_the_prompt_carries_the_confirmed_text() -> None:
    prompts: list[str] = []
    decode, state = scripted(prompts=prompts)
    streamer = WindowStreamer(decode, step_seconds=1.0, window_seconds=3.0)
    finals, _ = run(streamer, state, seconds=len(SENTENCE) * WORD_SECONDS)
    assert " ".join(f.text for f in finals).split() == SENTENCE
    assert streamer._offset > 0 and streamer._window.size / 16000 < 6
    assert any(p.startswith("the quick") or "fox" in p for p in prompts[3:])


def test_repeated_words_at_the_seam_are_dropped() -> None:
    streamer = WindowStreamer(lambda pcm, prompt: [], step_seconds=1.0)
    streamer._committed = [Word(0, 0.5, " over", 1), Word(0.5, 1.0, " the", 1)]
    jittered = [Word(0.9, 1.02, " the", 1), Word(1.0, 1.5, " lazy", 1)]
    assert streamer._repeated(jittered) == 1


class Windows:
    """echo's words for each window heard; ``calls`` counts the windows of each call to ``many``."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pcm: np.ndarray, prompt: str) -> list[Word]:
        return echo_words(pcm)

    def many(self, windows: Sequence[Window]) -> list[list[Word] | Exception]:
        self.calls.append(len(windows))
        return [echo_words(pcm) for pcm, _ in windows]


def _noise(levels: tuple[float, ...], seconds: float) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [(level * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for level in levels]


def test_steps_taken_together_give_what_steps_taken_alone_give_in_one_call_per_round() -> None:
    """Three streams stepped together (their windows heard in one call) and the same three stepped alone:
    the same updates, step for step; every round of steps is one call with all three windows."""
    audios = _noise((0.1, 0.2, 0.3), 6.0)
    shared = Windows()
    together = [WindowStreamer(shared, 1.0, 3.0, batch=shared.many) for _ in audios]
    alone = [WindowStreamer(Windows(), 1.0, 3.0) for _ in audios]
    got_together: list[list[StreamUpdate | Exception]] = [[] for _ in audios]
    got_alone: list[list[StreamUpdate | Exception]] = [[] for _ in audios]
    for start in range(0, audios[0].size, 1600):
        for streamers in (together, alone):
            for streamer, pcm in zip(streamers, audios, strict=True):
                streamer.feed(pcm[start : start + 1600])
        due = [i for i, streamer in enumerate(together) if streamer.due]
        assert due == [i for i, streamer in enumerate(alone) if streamer.due]
        if due:
            for i, update in zip(due, step_together([together[i] for i in due]), strict=True):
                got_together[i].append(update)
            for i in due:
                got_alone[i].append(alone[i].step())
    assert got_together == got_alone
    assert shared.calls == [3] * 6  # a step a second, all three in each call
    finals = [
        " ".join(u.final.text for u in updates if isinstance(u, StreamUpdate) and u.final) for updates in got_alone
    ]
    assert len(set(finals)) == 3 and all(finals)  # each stream its own words


def test_a_failed_batch_fails_every_step_in_it_and_a_failed_window_fails_its_step_alone() -> None:
    def broken(windows: Sequence[Window]) -> list[list[Word] | Exception]:
        raise RuntimeError("the model broke")

    def second_fails(windows: Sequence[Window]) -> list[list[Word] | Exception]:
        return [echo_words(pcm) if i != 1 else ValueError("window 1") for i, (pcm, _) in enumerate(windows)]

    for batch, expected in ((broken, ["the model broke"] * 3), (second_fails, [None, "window 1", None])):
        streamers = [WindowStreamer(Windows(), 1.0, 3.0, batch=batch) for _ in range(3)]
        for streamer, pcm in zip(streamers, _noise((0.1, 0.2, 0.3), 1.0), strict=True):
            streamer.feed(pcm)
        outcomes = step_together(streamers)
        assert [str(o) if isinstance(o, Exception) else None for o in outcomes] == expected
        assert all(isinstance(o, (Exception, StreamUpdate)) for o in outcomes)
    with pytest.raises(AssertionError, match="do not share a batch"):
        step_together([WindowStreamer(Windows(), batch=broken), WindowStreamer(Windows(), batch=second_fails)])


def test_segment_texts_join_with_spaces_except_between_unspaced_scripts() -> None:
    from hub.results import join_text

    assert join_text(["Please call", " Stella.", "", "Thanks"]) == "Please call Stella. Thanks"
    assert join_text(["今天天气", "很好"]) == "今天天气很好"
    assert join_text(["今天 OK", "很好"]) == "今天 OK 很好"
