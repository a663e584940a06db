"""The benchmark's smallest configuration runs end to end, so that it cannot rot (its figures are not judged here:
speed is for `make bench` and bench/README.md, not for timed tests on a noisy machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.timeout(600)
def test_smallest_benchmark_runs_and_reports_every_comparison(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--max-workers", "1", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (result_file,) = tmp_path.glob("*.json")
    assert (result_file.with_suffix(".png")).stat().st_size > 10_000
    result = json.loads(result_file.read_text())
    assert {
        "ratios",
        "targets",
        "overhead",
        "streaming",
        "gateway",
        "hubpool",
        "chunks",
        "scheduler",
        "crash",
        "batching",
        "meta",
    } <= set(result)
    rows = result["batching"]["rows"]
    assert [(r["workers"], r["threads"], r["max_batch"]) for r in rows] == [(2, 1, 1), (2, 1, 4)]  # the quick run's
    assert all(r["same_text"] for r in rows) and "batched decoding in the hub" in out.stdout
    names = " ".join(t["name"] for t in result["targets"])
    assert "M/D/c" in names and "CPU per echo request, supervisor" in names and "chunks forwarded" in names
    assert "supervisor CPU, 200 echo sessions" in names and "the scheduler alone" in out.stdout
    assert result["scheduler"]["sessions_with_partials"] == 200 and result["scheduler"]["hub_cpu_pct"] > 0
    assert result["chunks"]["chunks"] > 0 and result["overhead"]["sizes"][0]["audio_s"] == 0.01
    assert result["hubpool"]["pool_vs_one_hub"] > 0.5 and "through the pool" in out.stdout
    assert result["gateway"]["whisper_http_vs_sdk"] > 0.5 and result["gateway"]["echo_requests_per_s"]["http"] > 0
    assert result["streaming"]["finals"] > 0 and 0 <= result["streaming"]["wer_vs_whole"] < 0.5
    assert "speech to final text" in out.stdout and "ceiling" in out.stdout
    resumed = result["crash"]["crash"]["ring"]["sessions"]
    assert [r["resumes"] for r in resumed] == [1, 1, 1] and all(r["gap_s"] > 0 for r in resumed)
    assert result["crash"]["shm_left"] == [] and "crash under sessions" in out.stdout and "lost or doubled" in names
    long_rows = {r["setup"]: r for r in result["long_audio"]["rows"]}
    assert {"hub, 1 worker, split off", "hub, 1 worker, split on"} <= set(
        long_rows
    ) and "one long recording" in out.stdout
    assert long_rows["hub, 1 worker, split on"]["pieces"] >= 4 and all(r["wer"] < 0.3 for r in long_rows.values())
    assert "long audio: split on vs off" in names and "BatchedInferencePipeline" in names
    for scenario in ("duty", "continuous"):
        (row,) = result["live_turns"][scenario]["rows"]
        assert row["vad"] and row["final_latency_s"]["p95"] is not None and row["wer"]["mean"] < 0.3, row
    assert "live duty, 8 sessions on 2 workers, VAD on: utterance end → final p95" in names
    assert "live continuous, 4 sessions on 2 workers, VAD on" in names and "continuous scenario" in out.stdout


def _side(
    audio_per_s: float, p50_ms: float, rates: dict[str, float], rss_mb: float, processes: int, first_s: float
) -> dict:
    quiet = {"foreign_pct": 0.0}
    echo = {
        "latency": {"latency_ms": {"p50": p50_ms}, "usage": quiet},
        "load": {n: {"requests_per_s": r, "usage": quiet} for n, r in rates.items()},
    }
    whisper = {"audio_per_s": audio_per_s, "usage": quiet}
    return {
        "whisper": {"client": whisper, "http": {**whisper, "usage": {"foreign_pct": 80.0}}},
        "echo": {"client": echo, "http": echo},
        "rss_mb": rss_mb,
        "processes": processes,
        "first_answer_s": first_s,
    }


def test_peer_comparison_is_hub_over_ray_with_the_ceiling_as_the_yardstick() -> None:
    """bench.peer_report without Ray: each figure's hub/Ray ratio, which side is ahead, and the disturbed mark."""
    from bench.peer_report import comparisons, format_table

    result = {
        "ceiling": {"audio_per_s": 40.0, "usage": {"foreign_pct": 0.0}},
        "concurrency": 4,
        "in_flight": [2, 32],
        "replicas": 2,
        "clips": [9.8, 13.2],
        "hub": _side(36.0, 0.9, {"2": 1000.0, "32": 2000.0}, 500.0, 5, 3.0),
        "ray": _side(30.0, 3.6, {"2": 200.0, "32": 40.0}, 2500.0, 22, 12.0),
        "meta": {"ray_version": "2.60.0", "timestamp": "t", "machine": {"cores": 2}, "quick": True},
    }
    rows = {c.figure: c for c in comparisons(result)}
    throughput = rows["whisper throughput, share of the fair ceiling (SDK / handle, C=4)"]
    assert (throughput.hub, throughput.ray) == (0.9, 0.75) and abs(throughput.hub_over_ray - 1.2) < 1e-9
    assert throughput.hub_ahead and not throughput.disturbed
    assert rows["whisper throughput, share of the fair ceiling (HTTP, C=4)"].disturbed
    latency = rows["no-op p50, one request at a time (SDK / handle)"]
    assert latency.hub_over_ray == 0.25 and latency.hub_ahead  # lower is better
    assert rows["no-op requests/s, 32 in flight (HTTP)"].hub_over_ray == 50.0
    memory = rows["resident memory of all processes, after the whisper runs"]
    assert memory.hub_over_ray == 0.2 and "5 processes against 22" in memory.note
    slower = {**result, "ray": {**result["ray"], "first_answer_s": 1.5}}
    assert not next(c for c in comparisons(slower) if c.figure == "start to first answer").hub_ahead
    table = format_table(result)
    sdk, http = (line for line in table.splitlines() if line.startswith("| whisper throughput"))
    assert sdk.endswith("| 0.90 | 0.75 | 1.20 | hub ahead |") and http.endswith(
        "| 0.90 * | 0.75 * | 1.20 | hub ahead |"
    )
    assert "Ray ahead" not in table and "rerun on a quiet machine" in table


@pytest.mark.timeout(300)
def test_the_batched_decode_mode_runs_and_compares_tokens() -> None:
    """``python -m bench.streaming --batching K``'s measurement, at its smallest: two short windows."""
    from bench import batching

    figures = batching.measure(2, seconds=2.0, repeats=1)
    assert set(figures["wall_s"]) == {"worker", "one_at_a_time", "batched"} and min(figures["wall_s"].values()) > 0
    assert isinstance(figures["identical_tokens"], bool) and "identical tokens" in batching.summary(figures)


@pytest.mark.timeout(400)
def test_the_funasr_batch_bench_runs_on_the_cpu_with_the_tiny_paraformer(tmp_path: Path) -> None:
    """``bench.funasr_batch`` (what scripts/gpu_check.sh runs on CUDA with the large model), at its smallest."""
    pytest.importorskip("funasr", reason="the funasr extra is not installed (make install EXTRAS=funasr)")
    from bench import funasr_batch, paraformer

    model = paraformer.build(tmp_path / "tiny", paraformer.TINY)
    figures = funasr_batch.measure(
        tmp_path, model, funasr_batch.FunasrBatchPlan(batches=(1, 4), device="cpu", rounds=2)
    )
    one, four = figures["rows"]
    assert one["mean_batch"] == 1.0 and four["mean_batch"] > 1.0  # the worker really held batches
    assert one["device"] == four["device"] == "cpu" and one["gpu_memory_used_mb"] is None
    assert one["vs_batch_1"] == 1.0 and "largest batch against batch 1" in funasr_batch.summary(figures, "tiny")


def test_the_crash_bench_finds_words_lost_or_doubled_where_a_resumed_session_joins() -> None:
    """bench.crash's comparison: only what goes wrong at the resume point counts, and all of it does."""
    from bench.crash import Junction, junction, resumed_from
    from hub.wer import words

    ref = words("Please bring me a cup of coffee and a glass of water.")
    assert junction(ref, ref[:5], ref[5:]) == Junction(lost=0, doubled=0)
    assert junction(ref, ref[:5], ref[3:]) == Junction(lost=0, doubled=2)  # "a cup" said again after the resume
    assert junction(ref, ref[:5], ref[4:]) == Junction(lost=0, doubled=1)
    assert junction(ref, ref[:3], ref[4:]) == Junction(lost=1, doubled=0)  # "a" never confirmed
    assert junction(ref, ref[:3], ref[6:]) == Junction(lost=3, doubled=0)
    assert junction(ref, ref[:9], ref[1:]) == Junction(lost=0, doubled=8)  # a phrase longer than the span, whole
    assert junction(ref, [], ref) == Junction(lost=0, doubled=0)
    # the model's noise away from the resume point, or an extra word there that repeats nothing, is the WER's
    assert junction(ref, ref[:2], [*ref[2:9], "the", "glass", "of", "water"]) == Junction(lost=0, doubled=0)
    assert junction(ref, ref[:2], ref[2:6]) == Junction(lost=0, doubled=0)  # the last words missed, far away
    assert junction(ref, ref[4:8], ref[8:]) == Junction(lost=0, doubled=0)  # the first words missed
    assert junction(ref, ref[:5], ["a", "cop", *ref[5:]]) == Junction(lost=0, doubled=2)  # doubled, misheard
    assert junction(ref, ref[:5], ["um", *ref[5:]]) == Junction(lost=0, doubled=0)
    # a repetition the undisturbed run has too is no doubling
    twice = words("Hello hello world.")
    assert junction(twice, twice[:1], twice[1:]) == Junction(lost=0, doubled=0)
    assert junction(twice, twice[:2], twice[1:]) == Junction(lost=0, doubled=1)
    log = "x INFO hub.farm: session s2: resumed on whisper-2 from 4.25 s (attempt 2)\nsession s1: resumed on whisper-2 from 0.00 s"
    assert resumed_from(log) == [0.0, 4.25]
