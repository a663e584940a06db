"""``python -m bench.profile [--inline] [--seconds S] [--out DIR]``: where an echo request's CPU goes.

Runs the overhead benchmark's load (10 ms of audio, 32 requests in flight from one
``AsyncHubClient``) against a hub of two echo workers and profiles all three processes at
once: the client in-process with cProfile, the supervisor and one worker from outside with
py-spy (the ``bench`` extra installs it). Writes ``client.prof`` and ``client.txt`` (cProfile,
by own time), ``supervisor.txt``/``worker.txt`` (py-spy's collapsed stacks) and
``*.top.txt`` (the functions with the most samples, own and inclusive), and prints the CPU µs
per request of each process. Profilers slow what they watch: compare runs, not absolutes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench import load
from bench.clips import build_clips, of_length
from bench.hubproc import echo_provider, running_hub
from bench.overhead import IN_FLIGHT, NOOP_SAMPLES
from bench.procstats import Meter


def top(collapsed: Path, count: int = 30) -> str:
    """Own and inclusive shares of py-spy's collapsed stacks (``frame;frame;... samples`` per line)."""
    own, inclusive, total = Counter[str](), Counter[str](), 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            inclusive[frame] += int(n)
    lines = [f"{total} samples", "--- own"]
    lines += [f"{n / total:6.1%} {f}" for f, n in own.most_common(count)]
    lines += ["--- inclusive"] + [f"{n / total:6.1%} {f}" for f, n in inclusive.most_common(count)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--inline", action="store_true", help="send PCM inline instead of through shared memory")
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    pcm = of_length(NOOP_SAMPLES / 16000, build_clips())
    use_shm = not args.inline
    with tempfile.TemporaryDirectory() as tmp, running_hub(Path(tmp), "profile", {"echo": echo_provider(2)}) as hub:
        workers = hub.worker_pids("echo")
        load.closed_loop(hub.endpoint, [pcm], "echo", IN_FLIGHT, seconds=1.0, use_shm=use_shm)  # warm
        targets = {"supervisor": hub.pid, "worker": workers[0]}
        spies = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-r",
                    "400",
                    "-f",
                    "raw",
                    "-o",
                    str(args.out / f"{name}.txt"),
                    "-p",
                    str(pid),
                    "-d",
                    str(args.seconds),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in targets.items()
        ]
        groups = {"client": [os.getpid()], "hub": [hub.pid], "workers": workers}
        profiler = cProfile.Profile()
        with Meter(groups) as meter:
            profiler.enable()
            run = load.closed_loop(hub.endpoint, [pcm], "echo", IN_FLIGHT, seconds=args.seconds, use_shm=use_shm)
            profiler.disable()
        for proc in spies:
            proc.wait()
    rps = len(run.samples) / run.wall_s
    profiler.dump_stats(str(args.out / "client.prof"))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    (args.out / "client.txt").write_text(text.getvalue())
    for name in targets:
        if (args.out / f"{name}.txt").exists():
            (args.out / f"{name}.top.txt").write_text(top(args.out / f"{name}.txt"))
    cpu = {name: round(meter.usage[f"{name}_pct"] * 1e4 / rps) for name in groups}
    print(f"{rps:.0f} req/s under the profilers; CPU µs per request {cpu}; files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
