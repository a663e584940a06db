"""Live sessions under the benchmark: how long after a word is spoken it arrives as final text, and how
far the streamed text strays from the same audio transcribed whole.

The clips play into a session at real-time speed (``speed`` > 1 plays faster) in 100 ms chunks, as a
microphone would send them. A final segment's latency is the time it arrived minus the moment its
last word had been "spoken" (its end time in the stream, on the playback clock).

Modes: ``--sessions 1,2,4`` (K concurrent sessions on 2 one-thread workers, a row per K; with
``--one-shot-load``, each K again beside a stream of one-shot requests), ``--scheduler`` (200 echo
sessions on 4 echo workers: ``bench/scheduler.py``), ``--crash`` (a worker serving 3 sessions killed
mid-stream: ``bench/crash.py``) and ``--batching K`` (K sessions' windows decoded one
at a time against in one batched call: ``bench/batching.py``); issue 27's scenarios with VAD off and on:
``--duty-cycle`` (8 sessions of two utterances and silences) and ``--continuous`` (4 sessions of the 46 s
clips), ``bench/live_turns.py``; and ``--steps`` (a step's cost before and after one decode per step:
``bench/steps.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import batching, crash, live_turns, report, scheduler, steps
from bench.clips import build_clips
from bench.hubproc import running_hub, whisper_provider
from hub.client import HubClient
from hub.wer import word_error_rate

CHUNK = 1600  # 100 ms at 16 kHz


def play(
    client: HubClient, pcm: np.ndarray, speed: float, start_at: float | None = None
) -> tuple[list[float], str, int]:
    """Stream ``pcm`` (from ``start_at`` on the monotonic clock, or now); return each final's latency,
    the final text and the number of partials."""
    latencies: list[float] = []
    partials = 0
    with client.open_stream("whisper") as session:
        if start_at is not None:
            time.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()

        def read() -> None:
            nonlocal partials
            for event in session.results():
                if event.kind == "final" and event.segment is not None:
                    spoken_at = started + event.segment.end / speed
                    latencies.append(time.monotonic() - spoken_at)
                else:
                    partials += 1

        reader = threading.Thread(target=read)
        reader.start()
        for offset in range(0, pcm.size, CHUNK):
            time.sleep(max(0.0, started + offset / 16000 / speed - time.monotonic()))
            session.send(pcm[offset : offset + CHUNK])
        transcript = session.close()
        reader.join()
    return latencies, transcript.text, partials


def measure(workdir: Path, device: str = "cpu", speed: float = 1.0) -> dict[str, Any]:
    clips = build_clips()
    silence = np.zeros(8000, dtype=np.float32)
    pcm = np.concatenate([part for clip in clips for part in (clip, silence)])
    provider = whisper_provider(1, 2, device)
    provider["pool"] = {"min_size": 1, "max_size": 1, "max_sessions": 1}
    with (
        running_hub(workdir, "streaming", {"whisper": provider}) as hub,
        HubClient(hub.endpoint, timeout=120) as client,
    ):
        whole = client.transcribe(pcm, "whisper").text
        latencies, streamed, partials = play(client, pcm, speed)
    ordered = sorted(latencies)
    return {
        "audio_s": round(pcm.size / 16000, 2),
        "speed": speed,
        "finals": len(latencies),
        "partials": partials,
        "final_latency_s": {
            "mean": round(float(np.mean(ordered)), 3) if ordered else None,
            "p50": round(ordered[len(ordered) // 2], 3) if ordered else None,
            "max": round(ordered[-1], 3) if ordered else None,
        },
        "wer_vs_whole": round(word_error_rate(whole, streamed), 4),
        "whole_text": whole,
        "streamed_text": streamed,
    }


def _percentile(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def sessions_per_worker(
    workdir: Path,
    counts: tuple[int, ...],
    device: str = "cpu",
    speed: float = 1.0,
    workers: int = 2,
    one_shot: bool = False,
) -> list[dict[str, Any]]:
    """K concurrent sessions (each the committed clips, at the speed of speech) on ``workers`` tiny.en workers
    of one thread: speech-to-final p50/p95 over every final of every session, and each session's WER
    against the whole audio transcribed in one request, for each K. Starts are staggered over one
    ``step_ms`` so the sessions do not fall due in lockstep, as real microphones do not. With ``one_shot``,
    each K is measured again with a client sending one-shot requests of the clips one after another
    meanwhile: the sessions' latency with and without that load, and the one-shot requests' own."""
    clips = build_clips()
    silence = np.zeros(8000, dtype=np.float32)
    pcm = np.concatenate([part for clip in clips for part in (clip, silence)])
    provider = whisper_provider(workers, 1, device)
    provider["pool"]["sessions_per_worker"] = max(1, -(-max(counts) // workers))
    rows = []
    with running_hub(workdir, "sessions", {"whisper": provider}) as hub, HubClient(hub.endpoint, timeout=120) as client:
        whole = client.transcribe(pcm, "whisper").text
        for count in counts:
            for loaded in (False, True) if one_shot else (False,):
                rows.append(_sessions_row(hub.endpoint, client, pcm, whole, count, speed, workers, loaded, clips))
    return rows


def _sessions_row(
    endpoint: str,
    client: HubClient,
    pcm: np.ndarray,
    whole: str,
    count: int,
    speed: float,
    workers: int,
    loaded: bool,
    clips: list[np.ndarray],
) -> dict[str, Any]:
    results: list[tuple[list[float], str, int]] = [([], "", 0)] * count
    begin = time.monotonic() + 0.5
    done = threading.Event()
    jobs: list[float] = []

    def one(i: int) -> None:
        results[i] = play(client, pcm, speed, begin + i / max(1, count))

    def one_shots() -> None:
        with HubClient(endpoint, timeout=300) as own:
            while not done.is_set():
                started = time.monotonic()
                own.transcribe(clips[len(jobs) % len(clips)], "whisper")
                jobs.append(time.monotonic() - started)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    loader = threading.Thread(target=one_shots) if loaded else None
    for thread in [*threads, *([loader] if loader else [])]:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    if loader:
        loader.join()
    ordered = sorted(x for latencies, _, _ in results for x in latencies)
    wers = [word_error_rate(whole, text) for _, text, _ in results]
    row: dict[str, Any] = {
        "sessions": count,
        "workers": workers,
        "one_shot_load": loaded,
        "final_latency_s": {"p50": _percentile(ordered, 0.5), "p95": _percentile(ordered, 0.95)},
        "wer_vs_whole": {"mean": round(float(np.mean(wers)), 4), "max": round(max(wers), 4)},
    }
    if loaded:
        row["one_shot"] = {
            "jobs": len(jobs),
            "p50_s": _percentile(sorted(jobs), 0.5),
            "max_s": _percentile(sorted(jobs), 1.0),
        }
    return row


def sessions_summary(rows: list[dict[str, Any]]) -> str:
    """The sessions-per-worker table: speech-to-final latency and WER for each count of concurrent sessions
    (and, where measured, under one-shot load, with the one-shot requests' own latency)."""
    lines = [
        "\nconcurrent live sessions (tiny.en, 1 thread per worker):",
        "  sessions  workers  one-shot load          final p50 s  final p95 s  WER mean  WER max",
    ]
    for row in rows:
        latency, wer = row["final_latency_s"], row["wer_vs_whole"]
        shots = row.get("one_shot")
        load = f"{shots['jobs']} jobs, p50 {shots['p50_s']} s" if shots else "none"
        lines.append(
            f"  {row['sessions']:>8}  {row['workers']:>7}  {load:<21}  {latency['p50']!s:>11}  {latency['p95']!s:>11}"
            f"  {wer['mean']:>8.1%}  {wer['max']:>7.1%}"
        )
    return "\n".join(lines)


def summary(figures: dict[str, Any]) -> str:
    """The live-session lines of the benchmark's table."""
    latency = figures["final_latency_s"]
    return (
        f"\nlive session ({figures['audio_s']:.0f} s of speech at {figures['speed']:g}x real time, 100 ms chunks): "
        f"{figures['finals']} finals, {figures['partials']} partials\n"
        f"  speech to final text: mean {latency['mean']} s, p50 {latency['p50']} s, max {latency['max']} s\n"
        f"  word error rate of the streamed text against the same audio transcribed whole: {figures['wer_vs_whole']:.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--sessions", default="", help="e.g. 1,2,4,6: concurrent sessions on 2 workers, one row per count"
    )
    mode.add_argument(
        "--scheduler", action="store_true", help="the scheduler alone: 200 echo sessions at real time on 4 echo workers"
    )
    mode.add_argument(
        "--crash",
        action="store_true",
        help="SIGKILL a worker serving 3 sessions mid-stream; the texts against undisturbed runs",
    )
    mode.add_argument(
        "--batching", type=int, metavar="K", help="K session windows decoded one at a time against in one batched call"
    )
    mode.add_argument(
        "--duty-cycle",
        action="store_true",
        help="8 sessions of two utterances each followed by 6 s of silence, VAD off and on",
    )
    mode.add_argument(
        "--continuous", action="store_true", help="4 sessions of the 46 s clips on 2 workers, VAD off and on"
    )
    mode.add_argument(
        "--steps", action="store_true", help="a live step's cost: transcribe() against one decode per step"
    )
    mode.add_argument(
        "--decode-budget",
        action="store_true",
        help="decodes per session-minute of both scenarios' audio, VAD off and on, no clock",
    )
    parser.add_argument("--vad", choices=("off", "on", "both"), default="both", help="with --duty-cycle/--continuous")
    parser.add_argument(
        "--max-batch", type=int, default=1, help="with --duty-cycle/--continuous: pool.max_batch (steps in one pass)"
    )
    parser.add_argument("--undisturbed", type=int, default=2, help="with --crash: undisturbed runs (at least 2)")
    parser.add_argument(
        "--window-seconds", type=float, help="with --crash: stream.window_seconds (default 15, longer than a clip)"
    )
    parser.add_argument(
        "--one-shot-load",
        action="store_true",
        help="with --sessions: each count again beside a stream of one-shot requests",
    )
    args = parser.parse_args(argv)
    if args.decode_budget:
        figures = live_turns.decode_budget(args.device)
        print(json.dumps(figures, indent=2))
        print(live_turns.budget_summary(figures))
        return 0
    if args.steps:
        figures = steps.measure(device=args.device)
        print(json.dumps(figures, indent=2))
        print(steps.summary(figures))
        return 0
    if args.batching:
        batching.one_thread()
        figures = batching.measure(args.batching, device=args.device)
        print(json.dumps(figures, indent=2))
        print(batching.summary(figures))
        return 0
    with tempfile.TemporaryDirectory(prefix="asr-hub-bench-stream-") as workdir:
        if args.scheduler:
            figures = scheduler.measure(Path(workdir), scheduler.SchedulerPlan())
            print(json.dumps(figures, indent=2))
            print("\n".join(report.scheduler_lines(figures)))
            print("\n".join(report.target_line(t) for t in report.scheduler_targets(figures)))
            return 0
        if args.duty_cycle or args.continuous:
            vads = {"off": (False,), "on": (True,), "both": (False, True)}[args.vad]
            scenario = "duty" if args.duty_cycle else "continuous"
            figures = live_turns.measure(Path(workdir), scenario, args.device, vads, args.max_batch)
            print(json.dumps(figures, indent=2))
            print(live_turns.summary(figures))
            return 0
        if args.crash:
            figures = crash.measure(
                Path(workdir), crash.CrashPlan(undisturbed=args.undisturbed, window_s=args.window_seconds), args.device
            )
            print(json.dumps(figures, indent=2))
            print("\n".join(report.crash_lines(figures)))
            print("\n".join(report.target_line(t) for t in report.crash_targets(figures)))
            return 0
        if args.sessions:
            counts = tuple(int(n) for n in args.sessions.split(","))
            rows = sessions_per_worker(Path(workdir), counts, args.device, args.speed, one_shot=args.one_shot_load)
            print(json.dumps(rows, indent=2))
            print(sessions_summary(rows))
            return 0
        figures = measure(Path(workdir), args.device, args.speed)
    print(json.dumps(figures, indent=2))
    print(summary(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
