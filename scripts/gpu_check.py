"""Check GPU placement, readings and readiness for real on a GPU host, in one go: ``scripts/gpu_check.sh``.

Each item prints PASS or FAIL with what it saw; the exit status is 1 if any item failed. It needs the
NVIDIA driver, the ``whisper`` extra (and the ``cuda`` extra where the host has no system CUDA), and
nothing else: it starts its own hubs on loopback ports and stops them.

Items: CUDA ordinal against NVML index on every card; every worker on its expected card; per-process memory
readings; a decode on every worker; no provider stuck on GPU 0; the memory cap holding back a spawn on a
card filled on purpose; the quick CUDA benchmark (``--no-bench`` skips it: it takes several minutes); the
FunASR provider batched on torch's CUDA (``bench.funasr_batch``: a full-size Paraformer built offline with
random weights, max_batch 1/4/8/16, its throughput, latency and GPU memory, placed and read like any worker).
``--funasr-only`` runs only that last item, for a host where CTranslate2 cannot use the GPU (no cuBLAS 12).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hub.client import HubClient  # noqa: E402
from hub.supervisor import gpus  # noqa: E402

HEALTH_CLIP = ROOT / "workers" / "data" / "health.wav"
PROBE = "import json; from workers.cuda import visible_pci_bus_ids; print(json.dumps(visible_pci_bus_ids()))"
# holds the given number of MiB on the one card this process sees, until its stdin closes
FILLER = """
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device) == 0
code = cuda.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(int(sys.argv[1]) * 2**20))
print("filled" if code == 0 else f"cuMemAlloc failed: {code}", flush=True)
sys.stdin.read()
"""
FRACTION = 0.95

results: list[tuple[str, bool, str]] = []


def item(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(predicate: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


class Hub:
    """A supervisor on a temporary config, stopped with SIGTERM on exit."""

    def __init__(self, workdir: Path, providers: dict[str, Any], name: str) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        config = {
            "hub": {"frontend": self.endpoint, "runtime_dir": str(workdir / f"run-{name}")},
            "providers": providers,
        }
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub.supervisor", "--config", str(path)],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = HubClient(self.endpoint, timeout=300)

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def workers(self) -> list[dict[str, Any]]:
        return [dict(w, provider=n) for n, p in self.client.status()["providers"].items() for w in p["workers"]]


def check_ordinals(found: gpus.Discovery) -> None:
    """Each card as the hub pins it must be the card CUDA gives a process so pinned; and with only PCI order
    set, CUDA ordinal k within the hub's mask must be the hub's card k."""
    for card in found.cards:
        env = {**os.environ, "CUDA_DEVICE_ORDER": gpus.PCI_ORDER, "CUDA_VISIBLE_DEVICES": card.mask}
        seen = json.loads(
            subprocess.run(
                [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
            ).stdout
            or "[]"
        )
        ok = [gpus.normalize_pci(s) for s in seen] == [card.pci_bus_id]
        item(
            f"pinned card {card.ordinal}",
            ok,
            f"NVML {card.nvml_index} is PCI {card.pci_bus_id}; a worker pinned to it sees {seen}",
        )
    env = {**os.environ, "CUDA_DEVICE_ORDER": gpus.PCI_ORDER}
    seen = json.loads(
        subprocess.run(
            [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        ).stdout
        or "[]"
    )
    expected = [c.pci_bus_id for c in found.cards]
    item(
        "CUDA ordinal = hub ordinal",
        [gpus.normalize_pci(s) for s in seen] == expected,
        f"CUDA order {seen}, hub order {expected}",
    )


def decode_everywhere(hub: Hub, workers: list[dict[str, Any]]) -> set[str]:
    """Send jobs in parallel rounds until every worker has answered one (or 10 rounds pass)."""
    answered: set[str] = set()
    lock = threading.Lock()

    def one() -> None:
        with HubClient(hub.endpoint, timeout=300) as client:
            for provider in {w["provider"] for w in workers}:
                result = client.transcribe(HEALTH_CLIP, provider)
                if "hello" in result.text.lower():
                    with lock:
                        answered.add(str(result.worker))

    for _ in range(10):
        threads = [threading.Thread(target=one) for _ in range(2 * len(workers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if answered >= {w["id"] for w in workers}:
            break
    return answered


def check_pool(workdir: Path, found: gpus.Discovery) -> None:
    n = len(found.cards)
    provider = {"model": "tiny.en", "device": "cuda", "cpu_threads": 1, "pool": {"min_size": n, "max_size": n}}
    with Hub(workdir, {"whisper-a": provider, "whisper-b": provider}, "placement") as hub:
        try:
            hub.client.wait_ready(timeout=600)
        except Exception as exc:
            item("hub ready", False, f"{exc}; log: {hub.log}")
            return
        wait(lambda: all(w["gpu_memory_used_mb"] for w in hub.workers()), 30)
        workers = hub.workers()
        for w in workers:
            gpu = w["gpu"] or {}
            ok = (
                w["device"] == "cuda"
                and bool(gpu)
                and gpus.normalize_pci(w["cuda_pci_bus_id"]) == gpu.get("pci_bus_id")
            )
            item(
                f"worker {w['id']} on its card",
                ok,
                f"device {w['device']}, placed on {gpu}, its CUDA sees {w['cuda_pci_bus_id']!r}",
            )
            ok = (w["gpu_memory_used_mb"] or 0) > 0 and (w["gpu_memory_used_mb"] or 0) <= (w["gpu_card_used_mb"] or 0)
            item(
                f"worker {w['id']} memory",
                ok,
                f"own {w['gpu_memory_used_mb']} MiB of the card's {w['gpu_card_used_mb']}/{w['gpu_card_total_mb']} MiB "
                f"({w['gpu_error'] or 'no error'})",
            )
        for name in ("whisper-a", "whisper-b"):
            cards = sorted({w["gpu"]["ordinal"] for w in workers if w["provider"] == name and w["gpu"]})
            item(f"{name} spread", len(cards) == n, f"its {n} workers are on GPU(s) {cards} of {n}")
        per_card = {
            c.ordinal: sum(1 for w in workers if w["gpu"] and w["gpu"]["ordinal"] == c.ordinal) for c in found.cards
        }
        item("all cards used", all(per_card.values()), f"workers per card {per_card}")
        answered = decode_everywhere(hub, workers)
        missing = sorted({w["id"] for w in workers} - answered)
        item(
            "a decode on every worker",
            not missing,
            f"{len(answered)} of {len(workers)} answered 'hello'; missing {missing}",
        )


def check_cap(workdir: Path, found: gpus.Discovery) -> None:
    card = found.cards[-1]
    pool = {"min_size": 1, "max_size": 2, "max_gpu_memory_fraction": FRACTION}
    provider = {"model": "tiny.en", "device": "cuda", "devices": [card.ordinal], "cpu_threads": 1, "pool": pool}
    with Hub(workdir, {"capped": provider}, "cap") as hub:
        hub.client.wait_ready(timeout=600)
        if not wait(lambda: hub.workers()[0]["gpu_memory_used_mb"], 30):
            item("memory cap", False, "no per-process reading of the first worker, so no measured need")
            return
        w = hub.workers()[0]
        need, used, total = w["gpu_memory_used_mb"], w["gpu_card_used_mb"], w["gpu_card_total_mb"]
        fill = int(FRACTION * total - used - 1.5 * need)  # room for half a worker more under the cap
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": card.mask, "CUDA_DEVICE_ORDER": gpus.PCI_ORDER}
        filler = subprocess.Popen(
            [sys.executable, "-c", FILLER, str(fill)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            said = filler.stdout.readline().strip() if filler.stdout else ""
            if said != "filled":
                item("memory cap", False, f"could not fill GPU {card.ordinal} with {fill} MiB: {said}")
                return
            time.sleep(2.5)  # a sampling pass sees the filled card
            hub.client.scale("capped", 2)
            held = wait(lambda: "GPU memory cap" in hub.client.status()["providers"]["capped"]["held_back"], 20)
            status = hub.client.status()["providers"]["capped"]
            item(
                "memory cap holds back",
                held and status["size"] == 1,
                f"need {need:.0f} MiB, filled {fill} MiB; size {status['size']}, held_back {status['held_back']!r}",
            )
        finally:
            if filler.stdin:
                filler.stdin.close()
            filler.wait(30)
        grew = wait(lambda: hub.client.status()["providers"]["capped"]["size"] == 2, 30)
        item(
            "memory cap lets go",
            grew,
            "the second worker started once the filler left" if grew else "no second worker after the filler left",
        )


def check_funasr_batching(workdir: Path) -> None:
    """The FunASR provider on CUDA at max_batch 1/4/8/16: where its worker runs, NVML's reading of it, and
    the largest batch's throughput against batch 1's (``bench.funasr_batch.TARGET``)."""
    from bench import funasr_batch, paraformer

    started = time.perf_counter()
    model_dir = paraformer.build(workdir / "paraformer-large", paraformer.LARGE)
    model = f"Paraformer large, {paraformer.parameters(model_dir) / 1e6:.0f} M random weights"
    print(f"built {model} in {time.perf_counter() - started:.0f} s", flush=True)
    try:
        figures = funasr_batch.measure(workdir, model_dir, funasr_batch.FunasrBatchPlan())
    except Exception as exc:  # a hub that did not get ready says why
        item("FunASR batched on CUDA", False, str(exc)[-600:])
        return
    print(funasr_batch.summary(figures, model), flush=True)
    rows = figures["rows"]
    placed = all(
        r["device"] == "cuda" and r["gpu"] and gpus.normalize_pci(r["cuda_pci_bus_id"]) == r["gpu"] for r in rows
    )
    item(
        "FunASR worker on its card",
        placed,
        "; ".join(
            f"B={r['max_batch']}: {r['device']} on {r['gpu']}, its CUDA sees {r['cuda_pci_bus_id']!r}" for r in rows
        ),
    )
    read = all((r["gpu_memory_used_mb"] or 0) > 0 for r in rows)
    item(
        "FunASR worker memory",
        read,
        ", ".join(f"B={r['max_batch']}: {r['gpu_memory_used_mb']} MiB {r['gpu_error']}".strip() for r in rows),
    )
    best = rows[-1]
    item(
        f"FunASR batch {best['max_batch']} >= {funasr_batch.TARGET:g}x batch 1",
        best["vs_batch_1"] >= funasr_batch.TARGET,
        f"{best['vs_batch_1']:.2f}x ({best['audio_per_s']:.1f} against {rows[0]['audio_per_s']:.1f} audio s/s), "
        f"mean batch {best['mean_batch']}",
    )


def check_bench() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
    item("quick CUDA bench", run.returncode == 0, " | ".join(tail))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-bench", action="store_true", help="skip the quick CUDA benchmark")
    parser.add_argument(
        "--funasr-only", action="store_true", help="only the FunASR batching item (no CTranslate2 on the GPU)"
    )
    args = parser.parse_args()
    nvml = gpus.Nvml()
    found = gpus.discover(os.environ, nvml.devices())
    for warning in found.warnings:
        print(f"warning: {warning}")
    item("GPUs found", bool(found.cards), f"{found.source}: {[c.describe() for c in found.cards]} {nvml.error}")
    if found.cards:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            check_ordinals(found)
            if not args.funasr_only:
                check_pool(Path(tmp), found)
                check_cap(Path(tmp), found)
                if not args.no_bench:
                    check_bench()
            check_funasr_batching(Path(tmp))
    failed = [name for name, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} PASS, {len(failed)} FAIL" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
