"""The shipped Prometheus alerting rules: valid, their unit tests pass under promtool, and every metric they
name is one the hub exports."""

from __future__ import annotations

import re
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hub.supervisor import probes as http
from hub.supervisor.metrics import Metrics
from tests.conftest import ROOT, free_port, required_tool

pytestmark = pytest.mark.timeout(60)

OPERATIONS = ROOT / "docs" / "operations"


@pytest.mark.parametrize("command", [["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]])
def test_promtool_accepts_the_rules_and_their_unit_tests_pass(command: list[str]) -> None:
    promtool = required_tool("promtool", "Debian: apt-get install prometheus; scripts/install-test-packages.sh")
    out = subprocess.run([promtool, *command], cwd=OPERATIONS, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def _exported_series() -> set[str]:
    """The series names the hub's /metrics page can carry: its families as served, counters with their
    ``_total`` and histograms with their ``_bucket``/``_count``/``_sum``."""
    port = free_port()
    server = http.serve(Metrics(), "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            page = response.read().decode()
    finally:
        server.shutdown()
    names: set[str] = set()
    for family in text_string_to_metric_families(page):
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum")}
        else:
            names.add(family.name)
    return names


@pytest.mark.parametrize("name", ["alerts.yml", "alerts_test.yml"])
def test_every_metric_the_rules_name_is_exported(name: str) -> None:
    named = set(re.findall(r"\basr_hub_\w+", (OPERATIONS / name).read_text()))
    exported = _exported_series()
    assert named and exported
    assert named <= exported, f"{name} names metrics the hub does not export: {sorted(named - exported)}"
