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
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (result_file,) = tmp_path.glob("*.json")
    assert (result_file.with_suffix(".png")).stat().st_size > 10_000
    result = json.loads(result_file.read_text())
    assert {"ratios", "targets", "overhead", "streaming", "gateway", "hubpool", "chunks", "meta"} <= set(result)
    names = " ".join(t["name"] for t in result["targets"])
    assert "M/D/c" in names and "CPU per echo request, supervisor" in names and "chunks forwarded" in names
    assert result["chunks"]["chunks"] > 0 and result["overhead"]["sizes"][0]["audio_s"] == 0.01
    assert result["hubpool"]["pool_vs_one_hub"] > 0.5 and "through the pool" in out.stdout
    assert result["gateway"]["whisper_http_vs_sdk"] > 0.5 and result["gateway"]["echo_requests_per_s"]["http"] > 0
    assert result["streaming"]["finals"] > 0 and 0 <= result["streaming"]["wer_vs_whole"] < 0.5
    assert "speech to final text" in out.stdout and "ceiling" in out.stdout
