"""The rollback switch: pool.enabled: false, flipped in the file and applied by SIGHUP without a failed request."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from hub.client.rollback import set_pool_enabled
from hub.config import parse_config
from tests.conftest import ROOT, echo_provider, script_env, steady_load

pytestmark = pytest.mark.timeout(120)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)

CONFIG = """\
# the team's config
hub:
  frontend: tcp://127.0.0.1:5555   # where clients connect
providers:
  whisper:
    model: tiny.en
    pool:
      enabled: true        # the switch
      min_size: 2
      max_size: 4
  fast:
    type: echo
    pool: {min_size: 1, max_size: 2}
  small:
    type: echo
    pool:
      min_size: 2
      max_size: 2
  single:
    type: echo
"""


def test_the_switch_flips_every_pool_and_keeps_comments() -> None:
    off = set_pool_enabled(CONFIG, enabled=False)
    config = parse_config(yaml.safe_load(off))
    assert [p.pool.enabled for p in config.providers.values()] == [False] * 4
    assert "# the switch" in off and "# where clients connect" in off and "# the team's config" in off
    assert "pool: {enabled: false, min_size: 1, max_size: 2}" in off
    back = parse_config(yaml.safe_load(set_pool_enabled(off, enabled=True)))
    assert [p.pool.enabled for p in back.providers.values()] == [True, True, True, False]  # 'single' had no pool
    assert back.providers["whisper"].pool.max_size == 4


def test_rollback_script_under_load_fails_nothing(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=2, max_size=2)})
    old = {w["pid"] for w in hub.status()["providers"]["echo"]["workers"]}
    with steady_load(hub) as outcomes:
        time.sleep(0.5)
        out = subprocess.run(
            ["scripts/rollback.sh", str(hub.config_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=script_env(),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "sent SIGHUP" in out.stdout and hub.config_path.with_name(hub.config_path.name + ".bak").exists()
        deadline = time.monotonic() + 30
        while True:
            echo = hub.status()["providers"]["echo"]
            single = not echo["pool_enabled"] and [w["state"] for w in echo["workers"]] in (["idle"], ["busy"])
            if single and not old & {w["pid"] for w in echo["workers"]}:
                break
            assert time.monotonic() < deadline, echo
            time.sleep(0.1)
        time.sleep(0.5)
    assert outcomes["ok"] > 10 and set(outcomes) == {"ok"}, outcomes
    undo = subprocess.run(
        ["scripts/rollback.sh", str(hub.config_path), "--undo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=script_env(),
        timeout=60,
    )
    assert undo.returncode == 0, undo.stderr
    deadline = time.monotonic() + 30
    while not (echo := hub.status()["providers"]["echo"])["pool_enabled"] or echo["size"] != 2:
        assert time.monotonic() < deadline, echo
        time.sleep(0.1)


def test_rollback_without_a_running_hub_says_so(tmp_path) -> None:
    config = tmp_path / "hub.yaml"
    config.write_text(
        yaml.safe_dump(
            {"hub": {"runtime_dir": str(tmp_path / "run")}, "providers": {"echo": {"pool": {"min_size": 1}}}}
        )
    )
    out = subprocess.run(
        ["scripts/rollback.sh", str(config)], cwd=ROOT, capture_output=True, text=True, env=script_env(), timeout=60
    )
    assert out.returncode == 1 and "no running supervisor" in out.stderr
    assert parse_config(yaml.safe_load(config.read_text())).providers["echo"].pool.enabled is False


def test_rollback_module_keeps_the_old_text_and_refuses_a_file_it_cannot_make_valid(tmp_path) -> None:
    from hub.client.rollback import main as rollback

    config = tmp_path / "hub.yaml"
    config.write_text(CONFIG)
    assert rollback([str(config)]) == 0
    assert (tmp_path / "hub.yaml.bak").read_text() == CONFIG  # the old text, byte for byte
    assert config.read_text() == set_pool_enabled(CONFIG, enabled=False)
    # an unknown provider type stays invalid whatever the switch: exit 2, nothing written
    broken = "providers:\n  echo:\n    type: nope\n    pool: {min_size: 1}\n"
    config.write_text(broken)
    (tmp_path / "hub.yaml.bak").unlink()
    assert rollback([str(config)]) == 2
    assert config.read_text() == broken and not (tmp_path / "hub.yaml.bak").exists()
    assert rollback([str(tmp_path / "missing.yaml")]) == 2


def test_rollback_script_finds_the_python_that_has_the_hub(tmp_path) -> None:
    """Without a repo-root .venv the script takes the first Python on PATH that imports the hub, and says how
    to point it at one when there is none."""
    checkout = tmp_path / "checkout"  # a checkout whose packages live in a virtualenv elsewhere
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "rollback.sh", checkout / "scripts" / "rollback.sh")
    (checkout / "hub").symlink_to(ROOT / "hub")
    config = tmp_path / "hub.yaml"
    config.write_text(
        yaml.safe_dump(
            {"hub": {"runtime_dir": str(tmp_path / "run")}, "providers": {"echo": {"pool": {"min_size": 1}}}}
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    venv = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    found = subprocess.run(
        [str(checkout / "scripts" / "rollback.sh"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": venv},
    )
    assert found.returncode == 1 and "no running supervisor" in found.stderr, found.stderr
    tools = tmp_path / "bin"  # what the script needs, and no Python at all
    tools.mkdir()
    for tool in ("bash", "realpath", "dirname"):
        (tools / tool).symlink_to(shutil.which(tool))
    bare = subprocess.run(
        [str(checkout / "scripts" / "rollback.sh"), str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": str(tools)},
    )
    assert bare.returncode == 2 and "PYTHON=/path/to/venv/bin/python" in bare.stderr, bare.stderr
