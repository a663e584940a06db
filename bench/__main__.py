"""``python -m bench [--quick] [--device cpu|cuda] [--max-workers N] [--per-gpu K]``: run every comparison,
print the table, and write bench/results/<timestamp>.json and .png. On ``cuda`` the pool sizes are bounded by
the GPUs a hub started here would use times ``--per-gpu``, not by the cores."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import batching, chunks, crash, gateway, hubpool, live_turns, long_audio, report, scheduler, streaming
from bench.clips import build_clips, duration
from bench.matrix import MatrixPlan, run_matrix
from bench.overhead import OverheadPlan, measure
from bench.procstats import describe_machine
from bench.progress import elapsed, say
from bench.settings import hub_cards

RESULTS = Path(__file__).resolve().parent / "results"


def gateway_plan(args: argparse.Namespace) -> gateway.GatewayPlan:
    if args.quick:
        return gateway.GatewayPlan(
            round_trips=300, seconds=2, whisper_jobs=12, whisper_workers=args.max_workers, settle_s=2
        )
    return gateway.GatewayPlan(
        round_trips=1000, seconds=5, whisper_jobs=24, whisper_workers=args.max_workers, settle_s=30
    )


def hubpool_plan(args: argparse.Namespace) -> hubpool.PoolPlan:
    return (
        hubpool.PoolPlan(jobs=8, round_trips=300, settle_s=2)
        if args.quick
        else hubpool.PoolPlan(jobs=24, round_trips=1000, settle_s=30)
    )


def scheduler_plan(args: argparse.Namespace) -> scheduler.SchedulerPlan:
    """200 sessions either way (the target is about 200); the quick run streams 5 s instead of 20."""
    return scheduler.SchedulerPlan(seconds=5.0, settle_s=2) if args.quick else scheduler.SchedulerPlan()


def batching_plan(args: argparse.Namespace) -> batching.HubBatchPlan:
    """max_batch 1/2/4 on 1 worker x 2 threads and 2 x 1, C=8; the quick run only 1 and 4 on 2 x 1, 16 requests."""
    if args.quick:
        return batching.HubBatchPlan(batches=(1, 4), layouts=((2, 1),), jobs=16, device=args.device)
    return batching.HubBatchPlan(device=args.device)


def crash_plan(args: argparse.Namespace) -> crash.CrashPlan:
    """Both clients (ring and inline); the quick run the ring client only."""
    return crash.CrashPlan(clients=("ring",)) if args.quick else crash.CrashPlan()


def plans(args: argparse.Namespace, cores: int) -> tuple[MatrixPlan, OverheadPlan]:
    """The full matrix, or the reduced one (fewer sizes, levels and jobs) that fits in 3 minutes on 2 cores."""
    top = args.max_workers
    if args.quick:
        sizes = tuple(sorted({1, top}))
        return (
            MatrixPlan(
                args.device,
                cores,
                sizes,
                (1, 2, 4),
                jobs=8,
                load_jobs=30,
                settle_s=2,
                direct_threads=(cores,),
                retries=0,
            ),
            OverheadPlan(round_trips=500, seconds=2, size_reps=(20, 10, 5, 2), workers=top, settle_s=2),
        )
    return (
        MatrixPlan(
            args.device,
            cores,
            tuple(range(1, top + 1)),
            (1, 2, 4, 8, 16),
            jobs=24,
            load_jobs=120,
            settle_s=30,
            direct_threads=tuple(sorted({cores, 1}, reverse=True)),
            retries=1,
        ),
        OverheadPlan(round_trips=2000, seconds=5, size_reps=(100, 30, 20, 5), workers=top, settle_s=30),
    )


def main(argv: list[str] | None = None) -> int:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--max-workers",
        type=int,
        help="largest pool (default: the cores; on cuda, the GPUs times --per-gpu, its bound)",
    )
    parser.add_argument("--per-gpu", type=int, default=2, help="workers per GPU on cuda (default 2)")
    parser.add_argument("--quick", action="store_true", help="the reduced run (pool N=1 and max, C=1,2,4, fewer jobs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        cards = len(hub_cards())
        if cards == 0:
            parser.error("--device cuda: no GPU here (NVML lists none, or the inherited CUDA_VISIBLE_DEVICES is empty)")
        bound = cards * args.per_gpu
        if args.max_workers is not None and args.max_workers > bound:
            parser.error(
                f"--max-workers {args.max_workers} exceeds {cards} GPU(s) x --per-gpu {args.per_gpu} = {bound}"
            )
        args.max_workers = args.max_workers or bound
    args.max_workers = args.max_workers or cores
    if args.max_workers < 1:
        parser.error("--max-workers must be at least 1")
    matrix_plan, overhead_plan = plans(args, cores)
    clips = build_clips()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    say(
        f"{'quick' if args.quick else 'full'} run on {cores} cores, device {args.device}, "
        f"pool sizes {matrix_plan.pool_sizes}, concurrency {matrix_plan.concurrency}"
    )
    with tempfile.TemporaryDirectory(prefix="asr-bench-") as tmp:
        workdir = Path(tmp)
        result: report.Result = run_matrix(workdir, matrix_plan, clips)
        result["overhead"] = measure(workdir, clips, overhead_plan)
        result["gateway"] = gateway.measure(workdir, clips, gateway_plan(args))
        result["hubpool"] = hubpool.measure(workdir, clips, hubpool_plan(args))
        result["scheduler"] = scheduler.measure(workdir, scheduler_plan(args))
        result["chunks"] = chunks.measure(
            workdir, sessions=4, seconds=2.0 if args.quick else 5.0, settle_s=overhead_plan.settle_s
        )
        say(
            "live session: the clips played into a session, at twice real time"
            if args.quick
            else "live session: the clips played into a session at real time"
        )
        result["streaming"] = streaming.measure(workdir, args.device, speed=2.0 if args.quick else 1.0)
        result["crash"] = crash.measure(workdir, crash_plan(args), args.device)
        result["batching"] = batching.measure_hub(workdir, batching_plan(args))
        long_plan = long_audio.LongPlan(
            seconds=120.0 if args.quick else 300.0, workers=tuple(sorted({1, min(2, args.max_workers)}))
        )
        result["long_audio"] = long_audio.measure(workdir, args.device, long_plan)
        say("live at scale: the duty-cycle and continuous-speech scenarios, VAD on, at real time")
        result["live_turns"] = {
            scenario: live_turns.measure(workdir, scenario, args.device, vads=(True,))
            for scenario in ("duty", "continuous")
        }
    result["clips"] = [duration(c) for c in clips]
    result["meta"] = {
        "timestamp": stamp,
        "device": args.device,
        "quick": args.quick,
        "max_workers": args.max_workers,
        "machine": describe_machine(),
        "plan": {"matrix": vars(matrix_plan), "overhead": vars(overhead_plan)},
        "duration_s": elapsed(),
    }
    result["ratios"] = report.ratios(result)
    result["targets"] = report.targets(result)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{stamp}.json", args.out / f"{stamp}.png"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    from bench import chart  # matplotlib builds its font cache (running fc-list) on its first import

    chart.draw(result, png_path)
    print(report.format_table(result))
    print(streaming.summary(result["streaming"]))
    print(batching.hub_summary(result["batching"]))
    for figures in result["live_turns"].values():
        print(live_turns.summary(figures))
    say(f"done in {elapsed():.0f} s: {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
