"""One long recording (issue 25): split at pauses across the pool against one worker decoding it whole, and
against faster-whisper's own ``BatchedInferencePipeline`` in one process with the same total threads.

The recording is ~5 minutes of the committed clips in turn with pauses of 0.4-1.2 s between them (seeded),
so its reference text is known. Each hub setup gets a fresh supervisor with tiny.en workers of one thread:
split off (``split=False``) and on, on 1 and 2 workers. The long request runs alone (latency, and each
worker's CPU time for it), then again with a short request (one 3.6 s clip) sent a second in: its wait for a
worker (``queue_ms``) is what a short request pays for arriving behind a long one. ``BatchedInferencePipeline``
runs in a process of its own with ``cpu_threads`` = the hub's total threads and a worker's thread environment.

Wall-clock latency on a shared machine measures the other tenants as much as the setup, so each setup also
gets its **CPU critical path**: the CPU seconds of its busiest process for the request (of the busiest worker
for the hub; the pipeline's process CPU time over its threads, which assumes its threads scale perfectly, in
its favour). On a machine with a free core per thread that is the latency; the speed-up verdicts use it.

    python -m bench.long_audio [--device cpu|cuda] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.clips import DATA, SOURCES, read_wav
from bench.hubproc import running_hub, whisper_provider
from bench.progress import say
from bench.settings import MODEL, ROOT, compute_type, process_env
from hub.client import HubClient
from hub.wer import word_error_rate

SAMPLE_RATE = 16000
SHORT = "coffee"
SHORT_AFTER_S = 1.0


@dataclass(frozen=True)
class LongPlan:
    seconds: float = 300.0  # the recording's length
    workers: tuple[int, ...] = (1, 2)
    batch_size: int = 8  # BatchedInferencePipeline's
    piece_seconds: float = 30.0  # pool.split_piece_seconds
    repeats: int = 1  # each setup this many times, the fastest kept (a shared machine's noise only slows runs down)


def recording(seconds: float, seed: int = 25) -> tuple[np.ndarray, str]:
    """The committed clips in turn, with seeded pauses between them, up to ``seconds``; and what they say."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    said: list[str] = []
    total = 0
    while True:
        name = SOURCES[len(said) % len(SOURCES)]
        clip, pause = read_wav(DATA / f"{name}.wav"), np.zeros(int(rng.uniform(0.4, 1.2) * SAMPLE_RATE), np.float32)
        if total + clip.size > seconds * SAMPLE_RATE:
            break
        parts += [clip, pause]
        said.append((DATA / f"{name}.txt").read_text().strip())
        total += clip.size + pause.size
    return np.concatenate(parts), " ".join(said)


def _hub_run(
    workdir: Path, device: str, workers: int, split: bool, pcm: np.ndarray, said: str, plan: LongPlan
) -> dict[str, Any]:
    provider = whisper_provider(workers, 1, device)
    provider["pool"].update(split_over_seconds=60.0, split_piece_seconds=plan.piece_seconds)
    label = f"long-{workers}w-{'split' if split else 'whole'}"
    short = read_wav(DATA / f"{SHORT}.wav")
    with running_hub(workdir, label, {"whisper": provider}) as hub:
        with HubClient(hub.endpoint, timeout=600) as warm:
            warm.transcribe(short)  # every worker's first decode is slower; the pool has one done
        pids = hub.worker_pids("whisper")
        alone = [_alone(hub.endpoint, pids, pcm, split) for _ in range(plan.repeats)]
        latency, cpu_path, answer = min(alone, key=lambda run: run[0])
        waits = min((_beside(hub.endpoint, pcm, short, split) for _ in range(plan.repeats)), key=lambda w: w["queue_s"])
    audio_s = pcm.size / SAMPLE_RATE
    return {
        "setup": f"hub, {workers} worker{'s' if workers > 1 else ''}, split {'on' if split else 'off'}",
        "workers": workers,
        "split": split,
        "latency_s": round(latency, 2),
        "rtf": round(latency / audio_s, 4),
        "cpu_path_s": round(cpu_path, 2),
        "wer": round(word_error_rate(said, answer.text), 4),
        "pieces": int(answer.extra.get("pieces", 1)),
        "inference_s": round(answer.inference_ms / 1000.0, 2),
        "short_wait_s": round(waits.get("queue_s", float("nan")), 2),
        "short_latency_s": round(waits.get("latency_s", float("nan")), 2),
    }


def _cpu(pids: list[int]) -> list[float]:
    times = [psutil.Process(pid).cpu_times() for pid in pids]
    return [t.user + t.system for t in times]


def _alone(endpoint: str, pids: list[int], pcm: np.ndarray, split: bool) -> tuple[float, float, Any]:
    """The long request alone: (latency, the CPU seconds of the worker that worked most on it, transcript)."""
    before = _cpu(pids)
    with HubClient(endpoint, timeout=600) as client:
        began = time.perf_counter()
        answer = client.transcribe(pcm, split=split)
        latency = time.perf_counter() - began
    return latency, max(b - a for a, b in zip(before, _cpu(pids), strict=True)), answer


def _beside(endpoint: str, pcm: np.ndarray, short: np.ndarray, split: bool) -> dict[str, float]:
    """The long request again, with the short one sent ``SHORT_AFTER_S`` into it: the short one's wait."""
    waits: dict[str, float] = {}

    def short_request() -> None:
        time.sleep(SHORT_AFTER_S)
        with HubClient(endpoint, timeout=600) as client:
            sent = time.perf_counter()
            answer = client.transcribe(short)
            waits.update(latency_s=time.perf_counter() - sent, queue_s=answer.queue_ms / 1000.0)

    side = threading.Thread(target=short_request)
    with HubClient(endpoint, timeout=600) as client:
        side.start()
        client.transcribe(pcm, split=split)
    side.join(600)
    return waits


def _batched_run(
    workdir: Path, device: str, threads: int, pcm: np.ndarray, said: str, plan: LongPlan
) -> dict[str, Any]:
    """``BatchedInferencePipeline`` in a fresh process with a worker's thread environment, timed inside it."""
    audio = workdir / "long.npy"
    np.save(audio, pcm)
    env = {**os.environ, **process_env(threads, None), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench.long_audio", "--batched", str(audio), "--threads", str(threads),
               "--device", device, "--batch-size", str(plan.batch_size), "--repeats", str(plan.repeats)]  # fmt: skip
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    audio_s = pcm.size / SAMPLE_RATE
    return {
        "setup": f"BatchedInferencePipeline, 1 process x {threads} threads, batch {plan.batch_size}",
        "workers": 1,
        "split": True,
        "latency_s": round(got["seconds"], 2),
        "rtf": round(got["seconds"] / audio_s, 4),
        "cpu_path_s": round(got["cpu_s"] / threads, 2),
        "wer": round(word_error_rate(said, got["text"]), 4),
        "pieces": got["chunks"],
        "inference_s": round(got["seconds"], 2),
        "short_wait_s": None,
        "short_latency_s": None,
    }


def batched_child(path: Path, threads: int, device: str, batch_size: int, repeats: int) -> dict[str, Any]:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from workers.whisper import resolve_model

    model = WhisperModel(resolve_model(MODEL), device=device, compute_type=compute_type(device), cpu_threads=threads)
    pipeline = BatchedInferencePipeline(model)
    pcm = np.load(path)
    pipeline.transcribe(pcm[: 5 * SAMPLE_RATE], batch_size=batch_size)  # the first call is slower, as a worker's
    runs = []
    for _ in range(repeats):
        began, cpu = time.perf_counter(), time.process_time()
        segments, _ = pipeline.transcribe(pcm, batch_size=batch_size)
        texts = [s.text.strip() for s in segments]
        runs.append((time.perf_counter() - began, time.process_time() - cpu, texts))
    seconds, cpu_s, texts = min(runs, key=lambda run: run[0])
    return {"seconds": seconds, "cpu_s": cpu_s, "text": " ".join(t for t in texts if t), "chunks": len(texts)}


def measure(workdir: Path, device: str, plan: LongPlan = LongPlan()) -> dict[str, Any]:
    pcm, said = recording(plan.seconds)
    load_before = os.getloadavg()[0]
    say(
        f"long audio: {pcm.size / SAMPLE_RATE:.0f} s, split off and on, on {plan.workers} workers, "
        "and BatchedInferencePipeline"
    )
    rows = [_hub_run(workdir, device, n, split, pcm, said, plan) for n in plan.workers for split in (False, True)]
    rows.append(_batched_run(workdir, device, max(plan.workers), pcm, said, plan))
    load = os.getloadavg()[0]
    return {"audio_s": round(pcm.size / SAMPLE_RATE, 1), "piece_seconds": plan.piece_seconds, "repeats": plan.repeats,
            "load_before": round(load_before, 1), "load_after": round(load, 1), "rows": rows}  # fmt: skip


def _row(result: dict[str, Any], workers: int, split: bool) -> dict[str, Any]:
    return next(
        r for r in result["rows"] if r["workers"] == workers and r["split"] is split and r["setup"].startswith("hub")
    )


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 25's targets, from the rows of ``measure``."""
    from bench.report import _target

    top = max(r["workers"] for r in result["rows"])
    off, on = _row(result, top, False), _row(result, top, True)
    batched = next(r for r in result["rows"] if not r["setup"].startswith("hub"))
    piece_s = on["inference_s"] / max(1, on["pieces"])
    wall = f"wall clock {off['latency_s']:.1f} / {on['latency_s']:.1f} s = {off['latency_s'] / on['latency_s']:.2f}×"
    return [
        _target(
            f"long audio: split on vs off, {top} workers (speed-up of the CPU critical path)",
            off["cpu_path_s"] / on["cpu_path_s"],
            0.9 * top,
            True,
            "×",
            wall,
        ),
        _target(
            f"long audio: split on {top} workers vs BatchedInferencePipeline, same threads "
            "(speed-up of the CPU critical path)",
            batched["cpu_path_s"] / on["cpu_path_s"],
            1.0,
            True,
            "×",
            f"wall clock {batched['latency_s']:.1f} / {on['latency_s']:.1f} s "
            f"= {batched['latency_s'] / on['latency_s']:.2f}×",
        ),
        _target(
            "long audio: WER split on, over split off",
            on["wer"] - off["wer"],
            0.015,
            False,
            "",
            f"{on['wer']:.3f} vs {off['wer']:.3f}",
        ),
        _target(
            f"long audio: a short request's wait behind a split request, {top} workers",
            on["short_wait_s"],
            round(2 * piece_s, 2),
            False,
            "s",
            f"target: two pieces' mean decode ({piece_s:.2f} s each), i.e. the pieces running, never the queued ones",
        ),
    ]


def lines(result: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"one long recording ({result['audio_s']:.0f} s of speech with pauses, tiny.en, "
        f"pieces of at most {result['piece_seconds']:g} s;"
        f" a short request sent 1 s in; fastest of {result['repeats']}; load average {result['load_before']} before,"
        f" {result['load_after']} after):",
        "  setup                                                  latency s    RTF  CPU path s    WER  pieces"
        "  short wait s",
    ]
    for r in result["rows"]:
        wait = "-" if r["short_wait_s"] is None else f"{r['short_wait_s']:.2f}"
        out.append(
            f"  {r['setup']:<55}{r['latency_s']:>9.2f}{r['rtf']:>7.3f}{r['cpu_path_s']:>12.2f}"
            f"{r['wer']:>7.3f}{r['pieces']:>8}{wait:>14}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.long_audio", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=LongPlan.batch_size)
    parser.add_argument("--seconds", type=float, default=LongPlan.seconds, help="the recording's length (default 300)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setup, the fastest kept (default 1)")
    parser.add_argument("--batched", type=Path, help=argparse.SUPPRESS)  # the BatchedInferencePipeline child
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batched:
        print(json.dumps(batched_child(args.batched, args.threads, args.device, args.batch_size, args.repeats)))
        return 0
    from bench.report import target_line

    with tempfile.TemporaryDirectory(prefix="asr-bench-long-") as tmp:
        plan = LongPlan(seconds=args.seconds, batch_size=args.batch_size, repeats=args.repeats)
        result = measure(Path(tmp), args.device, plan)
    print(json.dumps(result, indent=1))
    print("\n".join(lines(result)))
    print("targets:")
    print("\n".join(target_line(t) for t in targets(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
