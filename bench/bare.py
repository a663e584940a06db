"""Bare faster-whisper processes, no hub: the "direct" baseline and the machine's "ceiling".

The parent starts N processes (``python -m bench.bare``) with the thread settings the
hub gives its workers (``cpu_threads`` and ``OMP_NUM_THREADS`` & co. in the environment
before CTranslate2 loads). Each loads the model, warms up on one clip and says ``ready``;
then one feeder thread per process takes the next clip number from a shared queue as soon
as its process is free, and waits for ``done``. A static split would underestimate the
ceiling when clip lengths differ. The pipe costs tens of microseconds per job, against
hundreds of milliseconds of inference. With N=1 and all cores' threads this is exactly
what a user writes without a hub: one model, clips one after another.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.clips import duration
from bench.procstats import Meter, peak_rss_mb
from bench.settings import MODEL, ROOT, compute_type, nvml_indices, pin, process_env
from bench.stats import Cell, Run, Sample
from hub.supervisor.gpus import Card


def save_clips(clips: list[np.ndarray], path: Path) -> None:
    np.savez(path, *clips)


def _start(clips_path: Path, threads: int, device: str, card: Card | None, log: Path) -> subprocess.Popen[str]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.bare", str(clips_path), "--threads", str(threads), "--device", device],
            cwd=ROOT,
            env=process_env(threads, card),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            bufsize=1,
        )


def _expect(proc: subprocess.Popen[str], word: str, log: Path) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"bare process {proc.pid} said {line!r}, expected {word!r}:\n{tail}")


def run_bare(
    kind: str,
    clips: list[np.ndarray],
    clips_path: Path,
    processes: int,
    threads: int,
    device: str,
    jobs: int,
    log: Path,
    settle_s: float,
) -> Cell:
    """``jobs`` clips through ``processes`` bare model processes fed from one shared queue."""
    cards = pin(device, processes)  # on a GPU host, each on the card the hub would give its worker
    procs = [_start(clips_path, threads, device, card, log) for card in cards]
    try:
        for proc in procs:
            _expect(proc, "ready", log)
        todo: queue.Queue[int] = queue.Queue()
        for i in range(jobs):
            todo.put(i)
        samples: list[Sample] = []
        errors: list[BaseException] = []

        def feed(proc: subprocess.Popen[str]) -> None:
            assert proc.stdin is not None
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    sent = time.perf_counter()
                    proc.stdin.write(f"{i % len(clips)}\n")
                    proc.stdin.flush()
                    _expect(proc, "done", log)
                    done = time.perf_counter()
                    samples.append(Sample(done - sent, duration(clips[i % len(clips)]), done))
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        feeders = [threading.Thread(target=feed, args=(p,)) for p in procs]
        groups = {"client": [os.getpid()], "workers": [p.pid for p in procs]}
        with Meter(groups, gpus=nvml_indices(cards), settle_s=settle_s) as meter:
            started = time.perf_counter()
            for t in feeders:
                t.start()
            for t in feeders:
                t.join()
            wall = time.perf_counter() - started
        if errors:
            raise errors[0]
        cell = Cell.of(kind, processes, threads, processes, Run(samples, wall))
        cell.rss_mb = [peak_rss_mb(p.pid) for p in procs]
        cell.usage = meter.usage
        return cell
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def open_model(threads: int, device: str) -> Callable[[np.ndarray], str]:
    """tiny.en as the hub's workers load it, transcribing with the default options: the bare processes use it,
    and so do the peers measured beside the hub (``bench.ray_serve``)."""
    from faster_whisper import WhisperModel

    from workers.whisper import resolve_model

    model = WhisperModel(resolve_model(MODEL), device=device, compute_type=compute_type(device), cpu_threads=threads)

    def transcribe(pcm: np.ndarray) -> str:
        segments, _info = model.transcribe(pcm)
        return " ".join(s.text for s in segments)  # decoding happens while the generator is consumed

    return transcribe


def _serve(clips_path: Path, threads: int, device: str) -> None:
    """The bare process: load, warm up, then transcribe each clip number read from stdin."""
    with np.load(clips_path) as data:
        clips = [data[f"arr_{i}"] for i in range(len(data.files))]
    transcribe = open_model(threads, device)
    transcribe(clips[0])
    print("ready", flush=True)
    for line in sys.stdin:
        transcribe(clips[int(line)])
        print("done", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("clips", type=Path, help="an .npz of float32 16 kHz clips")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    _serve(args.clips, args.threads, args.device)
