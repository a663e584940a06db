"""Batched decodes for live sessions: would a worker with several sessions due gain by decoding their
windows in one CTranslate2 call instead of one after another?

faster-whisper's model takes a batch of features: one ``encode`` for K windows, one ``generate`` for
their K prompts, one ``align`` for the word timings. This measures exactly that core, for K windows of
the committed clips as K sessions would hold them, two ways in one process with the worker's settings
(1 thread, the same compute type): one window per call (batch of 1) and all K in one call, stage by
stage, and whether the two give identical tokens. The worker's own decode (``transcribe`` with word
timings, one window at a time) is timed beside them: it does more than the core (a second pass when
the window ends inside a segment, the temperature fallback), so the core is a lower bound on any
batched decode built on it. CTranslate2 needs the start-of-transcript token at the same place in
every batch item, i.e. prompts of equal length; sessions' prompts (their confirmed text) differ, so
every window here decodes without a prompt.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.clips import build_clips
from bench.settings import MODEL, compute_type
from hub.supervisor.process import THREAD_VARS

OFFSET_S = 7.3  # where window i starts in the clips (i × this), so the K windows hold different speech
STAGES = ("features", "encode", "generate", "align")


def _windows(count: int, seconds: float) -> list[np.ndarray]:
    audio = np.concatenate(build_clips())
    size = int(seconds * 16000)
    starts = [int(i * OFFSET_S * 16000) % (audio.size - size) for i in range(count)]
    return [audio[start : start + size] for start in starts]


def one_thread() -> None:
    """The thread settings the hub gives a worker of ``cpu_threads: 1``; they count only before CTranslate2
    loads, so ``python -m bench.streaming --batching`` sets them first."""
    os.environ.update({var: "1" for var in THREAD_VARS})


def measure(count: int, seconds: float = 8.0, repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    from workers.whisper import resolve_model

    model = WhisperModel(resolve_model(MODEL), device=device, compute_type=compute_type(device), cpu_threads=1)
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    windows = _windows(count, seconds)

    def core(batch: list[np.ndarray]) -> tuple[list[list[int]], dict[str, float]]:
        """encode, generate (beam 5, temperature 0, as transcribe's first try) and align, ``batch`` at once."""
        spent: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            spent[stage] = now - clock
            clock = now

        features = np.stack([pad_or_trim(model.feature_extractor(w)[:, :-1]) for w in batch])
        lap("features")
        encoded = model.encode(features)
        lap("encode")
        prompt = model.get_prompt(tokenizer, [])
        results = model.model.generate(
            encoded, [prompt] * len(batch), beam_size=5, patience=1, length_penalty=1, max_length=model.max_length,
            suppress_blank=True, suppress_tokens=[-1], return_scores=True, return_no_speech_prob=True,
            sampling_temperature=0.0,
        )
        tokens = [[t for t in r.sequences_ids[0] if t < tokenizer.eot] for r in results]
        lap("generate")
        frames = [min(model.feature_extractor.nb_max_frames, w.size // model.feature_extractor.hop_length) for w in batch]
        model.model.align(encoded, tokenizer.sot_sequence, tokens, frames, median_filter_width=7)
        lap("align")
        return tokens, spent

    def one_at_a_time() -> tuple[list[list[int]], dict[str, float]]:
        tokens, total = [], dict.fromkeys(STAGES, 0.0)
        for window in windows:
            (t,), spent = core([window])
            tokens.append(t)
            total = {stage: total[stage] + spent[stage] for stage in STAGES}
        return tokens, total

    def worker_decodes() -> None:
        for window in windows:  # the call workers/whisper.py makes for a session's window
            segments, _ = model.transcribe(window, word_timestamps=True, condition_on_previous_text=False)
            list(segments)

    def timed(run: Callable[[], Any]) -> tuple[Any, float]:
        started = time.perf_counter()
        out = run()
        return out, time.perf_counter() - started

    core([windows[0]])  # warm up
    walls: dict[str, list[float]] = {"worker": [], "one_at_a_time": [], "batched": []}
    stages: dict[str, list[dict[str, float]]] = {"one_at_a_time": [], "batched": []}
    identical = True
    for _ in range(repeats):  # interleaved, so a burst of load elsewhere hits every way alike
        _, wall = timed(worker_decodes)
        walls["worker"].append(wall)
        (single, single_stages), wall = timed(one_at_a_time)
        walls["one_at_a_time"].append(wall)
        stages["one_at_a_time"].append(single_stages)
        (batched, batched_stages), wall = timed(lambda: core(windows))
        walls["batched"].append(wall)
        stages["batched"].append(batched_stages)
        identical = identical and single == batched
    median = {way: statistics.median(values) for way, values in walls.items()}
    return {
        "windows": count,
        "window_s": seconds,
        "repeats": repeats,
        "device": device,
        "wall_s": median,
        "stages_s": {
            way: {stage: statistics.median(run[stage] for run in runs) for stage in STAGES} for way, runs in stages.items()
        },
        "batched_vs_one_at_a_time": median["one_at_a_time"] / median["batched"],
        "identical_tokens": identical,
    }


def summary(f: dict[str, Any]) -> str:
    wall, stages = f["wall_s"], f["stages_s"]
    rows = "\n".join(
        f"  {way:<14}" + "".join(f"{stages[way][stage]:>10.3f}" for stage in STAGES) + f"{wall[way]:>10.3f}"
        for way in ("one_at_a_time", "batched")
    )
    return (
        f"\nbatched decodes ({f['windows']} session windows of {f['window_s']:g} s, tiny.en, 1 thread, {f['device']}; "
        f"median of {f['repeats']}; seconds):\n"
        f"  {'':<14}" + "".join(f"{stage:>10}" for stage in STAGES) + f"{'total':>10}\n{rows}\n"
        f"  the worker's decode today (transcribe, one window at a time): {wall['worker']:.3f} s\n"
        f"  batched against one at a time: {f['batched_vs_one_at_a_time']:.2f}x faster; identical tokens: "
        f"{'yes' if f['identical_tokens'] else 'NO'}"
    )
