import os
import signal
import subprocess
import sys

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
    """A client killed with its whole process group leaves its segment (its tracker dies too); the sweep removes it.

    Whether the killed tracker gets to clean up first is a race the kernel decides (it may read its pipe's end
    before its own SIGKILL lands), so the child takes its segment off its tracker's list: the state the race
    leaves in the usual case, made certain."""
    code = (
        "import sys, numpy as np; from multiprocessing import resource_tracker; from hub import shm\n"
        f"seg = shm.create_pcm({PREFIX!r}, np.zeros(10, np.float32))\n"
        "resource_tracker.unregister('/' + seg.name, 'shared_memory'); print(seg.name, flush=True)\n"
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
    # At once: another hub on this host (a parallel test run, say) sweeps every hub's orphans every few seconds.
    assert name in shm.list_segments(PREFIX), "the segment should outlive its owner"
    assert name in shm.sweep_orphans()
    assert name not in shm.list_segments(PREFIX)


def test_segment_pool_reuses_segments_and_removes_them_at_close() -> None:
    pool = shm.SegmentPool(PREFIX)
    first = pool.lease(np.full(160, 0.5, np.float32))
    assert first.size == shm.MIN_SEGMENT and np.array_equal(shm.read_pcm(first.name, 160, PREFIX), np.full(160, 0.5))
    pool.give_back(first, reusable=True)
    again = pool.lease(np.full(320, -0.25, np.float32))
    assert again is first and np.array_equal(shm.read_pcm(again.name, 320, PREFIX), np.full(320, -0.25))
    big = pool.lease(np.zeros(100_000, np.float32))  # 400 kB: the next power of two
    assert big is not first and big.size == 512 * 1024
    pool.give_back(big, reusable=True)
    pool.give_back(again, reusable=False)  # a worker may still read it: unlinked, not kept
    assert first.name not in shm.list_segments(PREFIX) and big.name in shm.list_segments(PREFIX)
    assert pool.lease(np.zeros(10, np.float32)) is big  # the smallest free segment that fits
    pool.give_back(big, reusable=True)
    pool.close()
    assert shm.list_segments(PREFIX) == []


def test_segment_pool_replaces_a_segment_someone_else_removed() -> None:
    pool = shm.SegmentPool(PREFIX)
    seg = pool.lease(np.ones(10, np.float32))
    pool.give_back(seg, reusable=True)
    shm.remove_all(PREFIX)  # what a hub does when it stops
    fresh = pool.lease(np.ones(10, np.float32))
    assert fresh is not seg and fresh.name in shm.list_segments(PREFIX)
    pool.give_back(fresh, reusable=True)
    pool.close()
    assert shm.list_segments(PREFIX) == []


def test_a_pool_never_closed_leaves_no_segment_when_its_process_exits() -> None:
    code = (
        "import numpy as np, weakref\n"
        "from hub import shm\n"
        f"pool = shm.SegmentPool({PREFIX!r})\n"
        "weakref.finalize(pool, pool.close)\n"
        "seg = pool.lease(np.ones(10, np.float32)); pool.give_back(seg, True); print(seg.name, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip().startswith(PREFIX), out.stderr
    assert "leaked" not in out.stderr and shm.list_segments(PREFIX) == []


def test_segment_reader_keeps_small_segments_mapped_and_sees_them_rewritten() -> None:
    pool, reader = shm.SegmentPool(PREFIX), shm.SegmentReader(PREFIX)
    seg = pool.lease(np.full(100, 0.5, np.float32))
    assert np.array_equal(reader.read(seg.name, 100), np.full(100, 0.5))
    pool.give_back(seg, reusable=True)
    again = pool.lease(np.full(200, -0.5, np.float32))  # the same segment, the next request's audio
    assert again is seg and np.array_equal(reader.read(seg.name, 200), np.full(200, -0.5))
    with pytest.raises(InvalidAudio, match="fewer than"):
        reader.read(seg.name, shm.MIN_SEGMENT)  # more than the segment holds
    with pytest.raises(InvalidAudio, match="not one of this hub"):
        shm.SegmentReader(shm.hub_prefix("otherhub")).read(seg.name, 10)
    kept = shm.SegmentReader.KEPT_BYTES // shm.MIN_SEGMENT
    others = [pool.lease(np.ones(10, np.float32)) for _ in range(kept + 2)]
    for other in others:
        reader.read(other.name, 10)
    assert len(reader._maps) == kept and seg.name not in reader._maps
    for other in [again, *others]:
        pool.give_back(other, reusable=True)
    pool.close()
    reader.close()
    assert shm.list_segments(PREFIX) == []
    with pytest.raises(InvalidAudio, match="does not exist"):
        reader.read(seg.name, 10)
