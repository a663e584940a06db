import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hub import shm
from hub.errors import InvalidAudio

PREFIX = shm.hub_prefix("testabcd")


def test_write_read_release() -> None:
    pcm = np.linspace(-1, 1, 1000, dtype=np.float32)
    with shm.create_pcm(PREFIX, pcm) as seg:
        assert seg.name in shm.list_segments(PREFIX) and shm.owner_pid(seg.name) == os.getpid()
        assert np.array_equal(shm.read_pcm(seg.name, 1000, PREFIX), pcm)
        with pytest.raises(InvalidAudio, match="fewer than"):
            shm.read_pcm(seg.name, 2000, PREFIX)
        with pytest.raises(InvalidAudio, match="not one of this hub"):
            shm.read_pcm(seg.name, 1000, shm.hub_prefix("otherhub"))
    assert seg.name not in shm.list_segments(PREFIX)
    seg.release()  # twice is harmless
    with pytest.raises(InvalidAudio, match="does not exist"):
        shm.read_pcm(seg.name, 1000, PREFIX)


def test_reading_from_another_process_does_not_unlink_it() -> None:
    """Python 3.11's resource tracker unlinks segments a process merely attached; our reader must not."""
    pcm = np.ones(100, dtype=np.float32)
    with shm.create_pcm(PREFIX, pcm) as seg:
        code = f"from hub import shm; print(float(shm.read_pcm({seg.name!r}, 100, {PREFIX!r}).sum()))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "100.0", out.stderr
        assert seg.name in shm.list_segments(PREFIX)


def test_names_outside_the_prefix_are_refused() -> None:
    for name in ("../etc/passwd", "asrhub_testabcd_notapid_zz", "other_segment"):
        with pytest.raises(InvalidAudio):
            shm.read_pcm(name, 1, PREFIX)


def test_probe() -> None:
    probe, nonce = shm.create_probe()
    try:
        assert shm.check_probe(probe.name, nonce)
        assert not shm.check_probe(probe.name, "x" * len(nonce))
        assert not shm.check_probe("asrhub_probe_1_00", nonce)
        assert not shm.check_probe("/etc/passwd", nonce)
    finally:
        probe.release()


def test_sweep_removes_segments_whose_owner_process_group_was_killed() -> None:
    """A client killed with its whole process group leaves its segment (its tracker dies too); the sweep removes it."""
    code = (
        "import sys, numpy as np; from hub import shm\n"
        f"seg = shm.create_pcm({PREFIX!r}, np.zeros(10, np.float32)); print(seg.name, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    name = proc.stdout.readline().strip()
    assert name in shm.list_segments(PREFIX)
    live = shm.sweep_orphans()
    assert name not in live  # its owner is alive: untouched
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.2)
    assert name in shm.list_segments(PREFIX), "the tracker should have died with the group"
    assert name in shm.sweep_orphans()
    assert name not in shm.list_segments(PREFIX)
