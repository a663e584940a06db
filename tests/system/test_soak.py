"""The soak run, short: CI drives it for ASR_HUB_SOAK_SECONDS (60 by default); `make soak` for longer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SECONDS = float(os.environ.get("ASR_HUB_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 240)
def test_soak_passes_its_own_checks() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", str(SECONDS), "--kill-every", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SECONDS + 200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAIL" not in out.stdout and out.stdout.count("PASS") == 4, out.stdout[-3000:]
    assert "per process, fitted after the first" in out.stdout and "supervisor: rss_mb" in out.stdout
    assert "gateway: rss_mb" in out.stdout  # the gateway is loaded and read too
    if SECONDS - min(600.0, SECONDS / 3) < 600:  # a short run prints its slopes but judges no projection
        assert "not judged (under 600 s of settled samples)" in out.stdout
