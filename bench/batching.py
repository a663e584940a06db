"""Batched decodes: in the hub (``measure_hub``: ``pool.max_batch`` 1/2/4 on 1 worker x 2 threads and 2 workers x
1 thread, at C callers, in ``make bench``), and for live sessions (``measure``): would a worker with several
sessions due gain by decoding their windows in one CTranslate2 call instead of one after another?

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

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.clips import build_clips
from bench.hubproc import running_hub, whisper_provider
from bench.load import closed_loop, warm_up
from bench.progress import say
from bench.settings import MODEL, ROOT, compute_type
from bench.stats import percentiles
from hub.client import AsyncHubClient, HubClient
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
            encoded,
            [prompt] * len(batch),
            beam_size=5,
            patience=1,
            length_penalty=1,
            max_length=model.max_length,
            suppress_blank=True,
            suppress_tokens=[-1],
            return_scores=True,
            return_no_speech_prob=True,
            sampling_temperature=0.0,
        )
        tokens = [[t for t in r.sequences_ids[0] if t < tokenizer.eot] for r in results]
        lap("generate")
        frames = [
            min(model.feature_extractor.nb_max_frames, w.size // model.feature_extractor.hop_length) for w in batch
        ]
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
            way: {stage: statistics.median(run[stage] for run in runs) for stage in STAGES}
            for way, runs in stages.items()
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


# --- batched decoding in the hub (pool.max_batch), issue 26 ----------------------------------------------

COMMITTED_CLIPS = ("coffee", "hello", "stella", "weather")  # tests/data: 1.3-4.7 s, one 30 s window each


@dataclass(frozen=True)
class HubBatchPlan:
    """``make bench``'s batching rows: each max_batch on each layout (workers, threads each), C callers."""

    batches: tuple[int, ...] = (1, 2, 4)
    layouts: tuple[tuple[int, int], ...] = ((1, 2), (2, 1))
    concurrency: int = 8
    jobs: int = 32
    batch_wait_ms: float = 5.0
    device: str = "cpu"


def committed_clips() -> list[np.ndarray]:
    from hub.audio import to_pcm

    return [to_pcm(ROOT / "tests" / "data" / f"{name}.wav") for name in COMMITTED_CLIPS]


def measure_hub(workdir: Path, plan: HubBatchPlan) -> dict[str, Any]:
    """Throughput and latency of a real hub (tiny.en) at C callers for every max_batch and layout, the batches
    its workers really formed (status ``mean_batch``), and whether every answer was the one-by-one text."""
    clips = committed_clips()
    rows = []
    expected: list[str] | None = None
    for workers, threads in plan.layouts:
        for batch in plan.batches:
            provider = whisper_provider(workers, threads, plan.device)
            provider["pool"].update(max_batch=batch, batch_wait_ms=plan.batch_wait_ms)
            label = f"batch-{workers}x{threads}-b{batch}"
            say(f"batching: {workers} worker(s) x {threads} thread(s), max_batch {batch}, C={plan.concurrency}")
            with running_hub(workdir, label, {"whisper": provider}) as hub:
                warm_up(hub.endpoint, clips, "whisper", workers)
                with HubClient(hub.endpoint, timeout=300) as client:
                    texts = [client.transcribe(pcm, "whisper").text for pcm in clips]  # one at a time: no batch
                run = closed_loop(hub.endpoint, clips, "whisper", plan.concurrency, jobs=plan.jobs)
                answers = _texts_under_load(hub.endpoint, clips, plan.concurrency)
                figures = hub.status().providers["whisper"]
            expected = expected or texts
            latency = percentiles([s.latency_s for s in run.samples])
            rows.append(
                {
                    "workers": workers,
                    "threads": threads,
                    "max_batch": batch,
                    "audio_per_s": run.audio_per_s,
                    "requests_per_s": run.requests_per_s,
                    "p50_s": latency["p50"],
                    "p95_s": latency["p95"],
                    "mean_batch": (figures.pool.figures.mean_batch if figures.pool else None),
                    "same_text": answers == [expected[i % len(clips)] for i in range(len(answers))]
                    and texts == expected,
                }
            )
    for row in rows:
        base = next(
            r for r in rows if (r["workers"], r["threads"], r["max_batch"]) == (row["workers"], row["threads"], 1)
        )
        row["vs_batch_1"] = row["audio_per_s"] / base["audio_per_s"]
    return {"plan": asdict(plan), "rows": rows}


def _texts_under_load(endpoint: str, clips: list[np.ndarray], concurrency: int) -> list[str]:
    """C requests at once, one per caller (so they batch), the texts in request order."""

    async def run() -> list[str]:
        async with AsyncHubClient(endpoint, timeout=300) as client:
            done = await asyncio.gather(
                *(client.transcribe(clips[i % len(clips)], "whisper") for i in range(concurrency))
            )
            return [t.text for t in done]

    return asyncio.run(run())


def hub_summary(f: dict[str, Any]) -> str:
    plan = f["plan"]
    lines = [
        f"\nbatched decoding in the hub (tiny.en, {plan['device']}, the 4 committed clips, C={plan['concurrency']}, "
        f"{plan['jobs']} requests, batch_wait_ms {plan['batch_wait_ms']:g}):",
        f"  {'layout':<18}{'max_batch':>10}{'audio s/s':>11}{'vs B=1':>8}{'p50 s':>8}{'p95 s':>8}{'mean batch':>12}  same text",
    ]
    for r in f["rows"]:
        mean = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
        lines.append(
            f"  {r['workers']} worker(s) x {r['threads']}t{'':<3}{r['max_batch']:>10}{r['audio_per_s']:>11.2f}"
            f"{r['vs_batch_1']:>7.2f}x{r['p50_s']:>8.2f}{r['p95_s']:>8.2f}{mean:>12}  {'yes' if r['same_text'] else 'NO'}"
        )
    return "\n".join(lines)
