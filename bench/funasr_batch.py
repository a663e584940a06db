"""The FunASR provider batched: throughput, latency and GPU memory at ``pool.max_batch`` 1/4/8/16.

``python -m bench.funasr_batch [--device cuda] [--size large|tiny] [--batches 1,4,8,16]``; run by
``scripts/gpu_check.sh`` on a GPU host. One worker of a Paraformer built offline with random weights
(``bench.paraformer``: paraformer-zh's full size by default), served by a real hub; for each batch size
B a fresh hub, a warm-up, then 2 x B callers in a closed loop sending the committed clips (so the worker
always has a full batch waiting). It reports the throughput (audio seconds per second) against B = 1,
p50/p95 latency, the batches the worker really formed (status ``mean_batch``) and the worker's own GPU
memory as NVML reads it by pid (status ``gpu_memory_used_mb``). The target on a GPU: B = 16 at least 3x B = 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import paraformer
from bench.batching import committed_clips
from bench.hubproc import PATIENT, running_hub
from bench.load import closed_loop, warm_up
from bench.progress import say
from bench.stats import percentiles

TARGET = 3.0  # the largest batch's throughput over batch 1's, on a GPU


@dataclass(frozen=True)
class FunasrBatchPlan:
    batches: tuple[int, ...] = (1, 4, 8, 16)
    device: str = "cuda"
    rounds: int = 6  # requests per caller
    batch_wait_ms: float = 5.0


def provider(model_dir: Path, batch: int, plan: FunasrBatchPlan) -> dict[str, Any]:
    pool = {
        "min_size": 1,
        "max_size": 1,
        "max_queue": 1024,
        "max_batch": batch,
        "batch_wait_ms": plan.batch_wait_ms,
        **PATIENT,
    }
    return {"type": "funasr", "model": str(model_dir), "device": plan.device, "cpu_threads": 1, "pool": pool}


def measure(workdir: Path, model_dir: Path, plan: FunasrBatchPlan) -> dict[str, Any]:
    clips = committed_clips()
    rows = []
    for batch in plan.batches:
        callers = 2 * batch
        say(f"funasr batching: max_batch {batch}, {callers} callers, {plan.device}")
        with running_hub(workdir, f"funasr-b{batch}", {"funasr": provider(model_dir, batch, plan)}) as hub:
            warm_up(hub.endpoint, clips, "funasr", 1)
            run = closed_loop(hub.endpoint, clips, "funasr", callers, jobs=callers * plan.rounds)
            figures = hub.status().providers["funasr"]
        worker = figures.workers[0]
        latency = percentiles([s.latency_s for s in run.samples])
        rows.append(
            {
                "max_batch": batch,
                "callers": callers,
                "requests": len(run.samples),
                "audio_per_s": run.audio_per_s,
                "requests_per_s": run.requests_per_s,
                "p50_s": latency["p50"],
                "p95_s": latency["p95"],
                "mean_batch": (figures.pool.figures.mean_batch if figures.pool else None),
                "device": worker.device,
                "gpu": None if worker.gpu is None else worker.gpu.pci_bus_id,
                "cuda_pci_bus_id": worker.cuda_pci_bus_id,
                "gpu_memory_used_mb": worker.gpu_memory_used_mb,
                "gpu_error": worker.gpu_error,
            }
        )
    base = rows[0]["audio_per_s"]
    for row in rows:
        row["vs_batch_1"] = row["audio_per_s"] / base
    return {"plan": asdict(plan), "rows": rows, "target": TARGET}


def summary(f: dict[str, Any], model: str) -> str:
    lines = [
        f"\nFunASR batched ({model}, {f['plan']['device']}, one worker, 2 x B callers, the committed clips):",
        f"  {'max_batch':>9}{'audio s/s':>11}{'vs B=1':>8}{'p50 s':>8}{'p95 s':>8}"
        f"{'mean batch':>12}{'GPU MiB':>9}  device",
    ]
    for r in f["rows"]:
        mean = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}"
        gpu = "-" if r["gpu_memory_used_mb"] is None else f"{r['gpu_memory_used_mb']:.0f}"
        lines.append(
            f"  {r['max_batch']:>9}{r['audio_per_s']:>11.2f}{r['vs_batch_1']:>7.2f}x"
            f"{r['p50_s']:>8.3f}{r['p95_s']:>8.3f}{mean:>12}{gpu:>9}  {r['device']}"
        )
    best = max(f["rows"], key=lambda r: r["max_batch"])
    lines.append(f"  largest batch against batch 1: {best['vs_batch_1']:.2f}x (target on a GPU: >= {f['target']:g}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.funasr_batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--size", choices=sorted(paraformer.SIZES), default="large")
    parser.add_argument("--batches", default="1,4,8,16", help="max_batch values, comma-separated (default 1,4,8,16)")
    parser.add_argument("--rounds", type=int, default=6, help="requests per caller (default 6)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    plan = FunasrBatchPlan(tuple(int(b) for b in args.batches.split(",")), args.device, args.rounds)
    with tempfile.TemporaryDirectory(prefix="funasr-batch-") as tmp:
        started = time.perf_counter()
        model_dir = paraformer.build(Path(tmp) / "paraformer", paraformer.SIZES[args.size])
        model = f"Paraformer {args.size}, {paraformer.parameters(model_dir) / 1e6:.1f} M random weights"
        say(f"built {model} in {time.perf_counter() - started:.1f} s")
        result = measure(Path(tmp), model_dir, plan)
    result["model"] = model
    print(summary(result, model))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
