"""The whisper comparisons 1-4 of issue 7: direct, single, pool N=1..max under C clients, ceiling;
and the open-loop run at 80% of the pool's peak throughput.

Every configuration transcribes the same clips with the same (default) options, one
configuration at a time, so each has the machine to itself. Jobs per cell are at least
twice the concurrency, so every caller sends more than one request and the cell is not
just its start-up burst.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench import load, mdc
from bench.bare import run_bare, save_clips
from bench.hubproc import RunningHub, running_hub, whisper_provider
from bench.procstats import Meter, disturbed, peak_rss_mb
from bench.progress import say
from bench.settings import hub_cards, nvml_indices
from bench.stats import Cell

PROVIDER = "whisper"
LOAD_FRACTION = 0.8


@dataclass(frozen=True)
class MatrixPlan:
    device: str
    cores: int
    pool_sizes: tuple[int, ...]  # N
    concurrency: tuple[int, ...]  # C
    jobs: int  # per cell, at least 2 × C
    load_jobs: int  # requests of the open-loop run at 80% load
    settle_s: float  # how long each measurement may wait for other processes to leave the machine quiet
    direct_threads: tuple[int, ...]  # thread counts for direct: all cores, and 1 (where more threads may not help)
    retries: int  # how often a measurement disturbed by other processes is taken again

    def threads(self, workers: int) -> int:
        """Each of N workers gets cores/N threads, so every configuration uses the whole machine."""
        return max(1, self.cores // workers)

    def jobs_for(self, concurrency: int) -> int:
        return max(self.jobs, 2 * concurrency)


def _show(cell: Cell) -> None:
    say(
        f"{cell.label}: {cell.audio_per_s:.1f} audio s/s, {cell.requests_per_s:.2f} req/s, "
        f"p50 {cell.latency_ms['p50']:.0f} ms, p99 {cell.latency_ms['p99']:.0f} ms"
    )


def least_disturbed(retries: int, take: Callable[[], Cell]) -> Cell:
    """Take a measurement; while other processes disturbed it, take it again (up to ``retries`` times)
    and keep the least disturbed. On a shared machine one test run elsewhere can halve a cell."""
    cell = take()
    _show(cell)
    for _ in range(retries):
        if not disturbed(cell.usage):
            break
        say(f"  other processes used {cell.usage['foreign_pct']:.0f}% of a core meanwhile: measuring again")
        again = take()
        _show(again)
        cell = min(cell, again, key=lambda c: c.usage["foreign_pct"] or 0.0)
    return cell


def _hub_cell(
    hub: RunningHub, plan: MatrixPlan, kind: str, workers: int, threads: int, concurrency: int, clips: list[np.ndarray]
) -> Cell:
    pids = hub.worker_pids(PROVIDER)
    groups = {"client": [os.getpid()], "hub": [hub.pid], "workers": pids}
    with Meter(
        groups, gpus=nvml_indices(hub_cards()) if plan.device == "cuda" else (), settle_s=plan.settle_s
    ) as meter:
        run = load.closed_loop(hub.endpoint, clips, PROVIDER, concurrency, jobs=plan.jobs_for(concurrency))
    cell = Cell.of(kind, workers, threads, concurrency, run)
    cell.rss_mb = [peak_rss_mb(p) for p in pids]
    cell.usage = meter.usage
    return cell


@dataclass
class Sweep:
    """One hub's results: its cells, what its start cost, and the 80% load run where there was one."""

    cells: list[Cell]
    startup: dict[str, float]
    load80: dict[str, Any] | None = None


def _sweep(workdir: Path, plan: MatrixPlan, clips: list[np.ndarray], kind: str, workers: int) -> Sweep:
    """Start one hub, warm every worker, then run each concurrency level against it."""
    threads = plan.threads(workers) if kind == "pool" else plan.cores
    provider = whisper_provider(workers if kind == "pool" else None, threads, plan.device)
    with running_hub(workdir, f"{kind}-{workers}", {PROVIDER: provider}) as hub:
        first_answer = load.warm_up(hub.endpoint, clips, PROVIDER, workers) - hub.started_at
        say(f"{kind} N={workers}: ready in {hub.ready_s:.1f} s, first answer after {first_answer:.1f} s")
        sweep = Sweep(
            [
                least_disturbed(plan.retries, partial(_hub_cell, hub, plan, kind, workers, threads, c, clips))
                for c in plan.concurrency
            ],
            {"ready_s": hub.ready_s, "first_answer_s": first_answer},
        )
        if kind == "pool" and workers == max(plan.pool_sizes):
            sweep.load80 = _load80(hub, sweep.cells, plan, clips)
        sweep.startup["hub_rss_mb"] = peak_rss_mb(hub.pid)
    return sweep


def _open_cell(hub: RunningHub, plan: MatrixPlan, like: Cell, rate: float, clips: list[np.ndarray]) -> Cell:
    groups = {"client": [os.getpid()], "hub": [hub.pid], "workers": hub.worker_pids(PROVIDER)}
    with Meter(
        groups, gpus=nvml_indices(hub_cards()) if plan.device == "cuda" else (), settle_s=plan.settle_s
    ) as meter:
        run = load.open_loop(hub.endpoint, clips, PROVIDER, rate, plan.load_jobs)
    cell = Cell.of("load80", like.workers, like.threads, 0, run)
    cell.usage = meter.usage
    return cell


def _load80(hub: RunningHub, cells: list[Cell], plan: MatrixPlan, clips: list[np.ndarray]) -> dict[str, Any]:
    """Poisson arrivals at 80% of the best closed-loop rate; latency against the unloaded (C=1) p50."""
    peak = max(c.requests_per_s for c in cells)
    rate = LOAD_FRACTION * peak
    say(f"pool N={cells[0].workers}: open loop at {rate:.2f} req/s (80% of {peak:.2f}), {plan.load_jobs} requests")
    cell = least_disturbed(plan.retries, partial(_open_cell, hub, plan, cells[0], rate, clips))
    unloaded = next((c for c in cells if c.concurrency == 1), cells[0]).latency_ms["p50"]
    service_ms = cell.to_dict()["inference_ms_p50"] or unloaded
    simulated = mdc.p99(load.arrivals(rate, plan.load_jobs, load.SEED), service_ms / 1000, cells[0].workers) * 1000
    say(
        f"  p50 {cell.latency_ms['p50']:.0f} ms, p99 {cell.latency_ms['p99']:.0f} ms; unloaded p50 {unloaded:.0f} ms; "
        f"M/D/{cells[0].workers} on the same arrivals with {service_ms:.0f} ms per job: p99 {simulated:.0f} ms"
    )
    return {
        "service_ms": service_ms,
        "mdc_p99_ms": simulated,
        "offered_rps": rate,
        "peak_rps": peak,
        "achieved_rps": cell.requests_per_s,
        "unloaded_p50_ms": unloaded,
        "cell": cell.to_dict(),
    }


def run_matrix(workdir: Path, plan: MatrixPlan, clips: list[np.ndarray]) -> dict[str, Any]:
    """Direct, ceiling for each N>1 (for N=1 it is the direct run with the pool's threads), single, pools."""
    clips_path = workdir / "clips.npz"
    save_clips(clips, clips_path)
    log = workdir / "bare.log"
    jobs = plan.jobs_for(max(plan.concurrency))
    cells = []
    for threads in plan.direct_threads:
        say(f"direct: one faster-whisper model, {threads} threads, {jobs} clips one after another")
        take = partial(run_bare, "direct", clips, clips_path, 1, threads, plan.device, jobs, log, plan.settle_s)
        cells.append(least_disturbed(plan.retries, take))
    for n in plan.pool_sizes:
        if n > 1:
            say(f"ceiling: {n} bare processes × {plan.threads(n)} threads from a shared queue, {jobs} clips")
            take = partial(
                run_bare, "ceiling", clips, clips_path, n, plan.threads(n), plan.device, jobs, log, plan.settle_s
            )
            cells.append(least_disturbed(plan.retries, take))
    result: dict[str, Any] = {"startup": {}, "load80": None}
    for kind, workers in [("single", 1), *(("pool", n) for n in plan.pool_sizes)]:
        sweep = _sweep(workdir, plan, clips, kind, workers)
        cells += sweep.cells
        result["startup"][f"{kind}-{workers}"] = sweep.startup
        result["load80"] = sweep.load80 or result["load80"]
    return {"cells": [c.to_dict() for c in cells], **result}
