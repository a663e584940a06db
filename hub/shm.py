"""Shared-memory PCM: the client writes float32 samples, the worker maps them, no byte crosses the supervisor.

Names are ``asrhub_<tag>_<owner pid>_<random>``: ``tag`` is the hub id (so a worker can
refuse another hub's segment) or ``probe`` for the same-host check. The owner pid in
the name lets the supervisor remove segments whose creator is gone, which the
creator's resource tracker does not do when its whole process group is killed.

Readers never go through ``multiprocessing.shared_memory``: on Python 3.11 merely
attaching registers the segment with the reader's resource tracker, which then
unlinks it when the reader exits. Readers open ``/dev/shm/<name>`` themselves.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import threading
from collections import OrderedDict
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from hub.errors import InvalidAudio

SHM_DIR = Path("/dev/shm")
ROOT = "asrhub_"
PROBE_TAG = "probe"
_NAME_RE = re.compile(r"^asrhub_([0-9a-z]+)_([0-9]+)_([0-9a-f]+)$")


def hub_prefix(hub_id: str) -> str:
    """The prefix of every segment made for the hub ``hub_id``."""
    return f"{ROOT}{hub_id}_"


def owner_pid(name: str) -> int | None:
    """The pid that created the segment, or None for a name that is not ours."""
    match = _NAME_RE.match(name)
    return int(match.group(2)) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PcmSegment:
    """A segment the caller owns: unlinked by ``release`` (or by the owner's tracker, or the hub's sweep)."""

    def __init__(self, prefix: str, data: bytes | np.ndarray, size: int = 0) -> None:
        # no copy; ndarray.data is memoryview(array) (numpy's stubs give ndarray __buffer__ only from Python 3.12)
        raw = (np.ascontiguousarray(data).data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        self.name = f"{prefix}{os.getpid()}_{secrets.token_hex(8)}"
        self.size = max(len(raw), size, 1)
        self._shm: shared_memory.SharedMemory | None = None
        try:
            self._shm = shared_memory.SharedMemory(name=self.name, create=True, size=self.size)
            self.buf[: len(raw)] = raw
        except BaseException:  # a Ctrl-C (KeyboardInterrupt) here: the caller never gets the segment to release
            self._shm = None
            _remove_registered(self.name)
            raise

    def write(self, pcm: np.ndarray) -> None:
        """Overwrite the start of the segment with float32 samples (a reused segment's next request)."""
        view = np.frombuffer(self.buf, dtype=np.float32, count=pcm.size)
        view[:] = pcm
        del view  # no exported buffer may outlive the call, or the segment cannot be closed

    def exists(self) -> bool:
        """False once someone else unlinked it (a hub that stopped removes its segments)."""
        return (SHM_DIR / self.name).exists()

    @property
    def buf(self) -> memoryview:
        assert self._shm is not None, "released"
        buf = self._shm.buf
        assert buf is not None  # None only once closed, and release() drops a closed segment
        return buf

    def release(self) -> None:
        """Close and unlink; safe to call twice and after someone else removed the segment."""
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        shm.close()
        try:
            shm.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> PcmSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


MIN_SEGMENT = 64 * 1024  # one second of float32 PCM at 16 kHz fits the smallest segment
MAX_KEPT_BYTES = 64 * 1024 * 1024  # free segments a client keeps for reuse, at most


class SegmentPool:
    """A client's reusable segments: a request leases one, writes its PCM, gives it back after the answer.

    Creating and unlinking a segment per request costs system calls and two messages to the resource
    tracker; a segment reused costs one copy. Sizes are powers of two from ``MIN_SEGMENT`` so that
    clips of similar length share them; free segments beyond ``MAX_KEPT_BYTES`` are unlinked. ``close``
    unlinks every segment; one leased at that moment is unlinked when it comes back. Thread-safe.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._free: list[PcmSegment] = []
        self._lock = threading.Lock()
        self._closed = False

    def lease(self, pcm: np.ndarray) -> PcmSegment:
        pcm = np.ascontiguousarray(pcm, dtype=np.float32)
        segment = self.lease_room(pcm.nbytes)
        segment.write(pcm)
        return segment

    def lease_room(self, nbytes: int) -> PcmSegment:
        """A segment of at least ``nbytes``, its content undefined (a new one holds no memory until written)."""
        need = max(nbytes, 1)
        with self._lock:
            fits = [seg for seg in self._free if seg.size >= need]
            segment = min(fits, key=lambda seg: seg.size) if fits else None
            if segment is not None:
                self._free.remove(segment)
        if segment is not None and not segment.exists():
            segment.release()
            segment = None
        if segment is None:
            return PcmSegment(self.prefix, b"", size=max(MIN_SEGMENT, 1 << (need - 1).bit_length()))
        return segment

    def give_back(self, segment: PcmSegment, reusable: bool) -> None:
        """Keep ``segment`` for the next request, or unlink it (``reusable`` False: a worker may still read it)."""
        with self._lock:
            keep = reusable and not self._closed and sum(s.size for s in self._free) + segment.size <= MAX_KEPT_BYTES
            if keep:
                self._free.append(segment)
        if not keep:
            segment.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for segment in free:
            segment.release()


class PcmBuffer:
    """Room for up to ``capacity`` float32 samples that the caller fills in place and then hands to ``transcribe``.

    Made by a client (``AsyncHubClient.pcm_buffer``): in a segment of that client's pool when its hub shares
    ``/dev/shm``, so the request then sends the samples without copying them again, else in process memory.
    Untouched room costs no memory, so the capacity may be an upper bound. ``view()`` is the writable room
    (drop it before the call: a segment with a live view cannot be closed); set ``size`` to the samples
    written. A request takes the segment over; ``release`` gives back one that no request took.
    """

    def __init__(self, capacity: int, pool: SegmentPool | None) -> None:
        self.capacity = capacity
        self.size = 0
        self.pool = pool
        self.segment: PcmSegment | None = pool.lease_room(capacity * 4) if pool is not None else None
        self._memory: np.ndarray | None = np.empty(capacity, dtype=np.float32) if pool is None else None

    def view(self) -> np.ndarray:
        if self.segment is not None:
            return np.frombuffer(self.segment.buf, dtype=np.float32, count=self.capacity)
        assert self._memory is not None, "released"
        return self._memory

    def samples(self) -> np.ndarray:
        """The samples written, as an array of their own (a copy only when they are in a segment)."""
        return self.view()[: self.size].copy() if self.segment is not None else self.view()[: self.size]

    def take(self, pool: SegmentPool | None) -> PcmSegment | None:
        """The segment, for a request of ``pool``'s client, which then gives it back; None if it is another pool's."""
        if self.segment is None or pool is not self.pool:
            return None
        segment, self.segment = self.segment, None
        return segment

    def release(self) -> None:
        if self.segment is not None and self.pool is not None:
            self.pool.give_back(self.segment, reusable=True)
        self.segment = self._memory = None


def create_pcm(prefix: str, pcm: np.ndarray) -> PcmSegment:
    """Put float32 samples in a new segment named under ``prefix``."""
    return PcmSegment(prefix, np.ascontiguousarray(pcm, dtype=np.float32))


def _map_segment(name: str, size: int) -> mmap.mmap:
    """Map a whole segment read-only, once it is known to hold at least ``size`` bytes."""
    path = SHM_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise InvalidAudio(f"shared-memory segment {name!r} does not exist (released, or never created)") from None
    except OSError as exc:
        raise InvalidAudio(f"shared-memory segment {name!r} cannot be opened: {exc.strerror}") from None
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise InvalidAudio(f"shared-memory segment {name!r} holds {actual} bytes, fewer than the {size} claimed")
        return mmap.mmap(fd, actual, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def _read_bytes(name: str, size: int) -> bytes:
    with _map_segment(name, size) as view:
        return view[:size]


def read_pcm(name: str, samples: int, prefix: str) -> np.ndarray:
    """Copy ``samples`` float32 samples out of a client's segment, refusing names outside ``prefix``."""
    if not name.startswith(prefix) or owner_pid(name) is None:
        raise InvalidAudio(f"shared-memory segment {name!r} is not one of this hub's (names start with {prefix!r})")
    return np.frombuffer(_read_bytes(name, samples * 4), dtype=np.float32)


class SegmentReader:
    """A worker's reads of client segments, keeping the last few small ones mapped.

    Clients reuse their segments (``SegmentPool``), so a request usually names a segment this worker
    has mapped before: reading it is then one copy instead of open, fstat, mmap, munmap and close.
    Names are never reused, so a kept mapping always shows its own segment. Only segments of up to
    ``MAX_MAPPED_BYTES`` are kept, ``KEPT_BYTES`` of them at most (a client with 32 requests in flight
    has 32 segments of 64 KiB), which bounds the memory that segments their clients have since
    unlinked still hold here.
    """

    KEPT_BYTES = 16 * 1024 * 1024
    MAX_MAPPED_BYTES = 1024 * 1024

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()

    def read(self, name: str, samples: int, offset: int = 0) -> np.ndarray:
        """Copy ``samples`` float32 samples from sample ``offset`` on out of a client's segment, refusing
        names outside the prefix."""
        if not name.startswith(self.prefix) or owner_pid(name) is None:
            raise InvalidAudio(
                f"shared-memory segment {name!r} is not one of this hub's (names start with {self.prefix!r})"
            )
        first, size = offset * 4, (offset + samples) * 4
        view = self._maps.get(name)
        if view is None or len(view) < size:
            view = _map_segment(name, size)
            if len(view) > self.MAX_MAPPED_BYTES:
                with view:
                    return np.frombuffer(view[first:size], dtype=np.float32)
            self._keep(name, view)
        self._maps.move_to_end(name)
        return np.frombuffer(view[first:size], dtype=np.float32)

    def _keep(self, name: str, view: mmap.mmap) -> None:
        old = self._maps.pop(name, None)
        if old is not None:
            old.close()
        self._maps[name] = view
        while sum(len(kept) for kept in self._maps.values()) > self.KEPT_BYTES:
            self._maps.popitem(last=False)[1].close()

    def close(self) -> None:
        while self._maps:
            self._maps.popitem()[1].close()


class Ring:
    """A live stream's ring buffer (client side): float32 samples written round and round.

    ``written`` counts every sample ever written; the reader asks for ``[start, end)`` in
    those terms, and the writer must not run more than ``capacity`` ahead of what the
    reader has taken (the client's session waits for the worker's acknowledgements).
    """

    def __init__(self, prefix: str, capacity: int) -> None:
        self.capacity = capacity
        self.written = 0
        self.segment = PcmSegment(prefix, bytes(capacity * 4))

    @property
    def name(self) -> str:
        return self.segment.name

    def write(self, pcm: np.ndarray) -> int:
        """Append ``pcm`` (at most ``capacity`` samples); return the new ``written``."""
        if pcm.size > self.capacity:
            raise ValueError(f"a chunk of {pcm.size} samples exceeds the ring's {self.capacity}")
        view = np.frombuffer(self.segment.buf, dtype=np.float32, count=self.capacity)
        pos = self.written % self.capacity
        first = min(pcm.size, self.capacity - pos)
        view[pos : pos + first] = pcm[:first]
        view[: pcm.size - first] = pcm[first:]
        del view  # no exported buffer may outlive the call, or the segment cannot be closed
        self.written += pcm.size
        return self.written

    def release(self) -> None:
        self.segment.release()


class RingReader:
    """The worker's side of a ``Ring``: mapped once for the session, read by absolute sample positions."""

    def __init__(self, name: str, capacity: int, prefix: str) -> None:
        if not name.startswith(prefix) or owner_pid(name) is None:
            raise InvalidAudio(f"shared-memory segment {name!r} is not one of this hub's (names start with {prefix!r})")
        self.capacity = capacity
        size = capacity * 4
        try:
            fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidAudio(f"shared-memory ring {name!r} cannot be opened: {exc.strerror}") from None
        try:
            if os.fstat(fd).st_size < size:
                raise InvalidAudio(f"shared-memory ring {name!r} is smaller than the {size} bytes claimed")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def read(self, start: int, end: int) -> np.ndarray:
        """Copy samples ``[start, end)``; the writer may be at most ``capacity`` ahead of ``start``."""
        if not 0 <= start <= end or end - start > self.capacity:
            raise InvalidAudio(f"ring positions {start}..{end} are out of order or overran the ring")
        view = np.frombuffer(self._map, dtype=np.float32, count=self.capacity)
        idx = np.arange(start, end) % self.capacity
        out = view[idx]  # fancy indexing copies
        del view
        return out

    def close(self) -> None:
        self._map.close()


def share(name: str, prefix: str) -> str:
    """A second name for a client's segment, owned by this process (a hard link: no byte is copied).

    The client unlinks its own name once its request is answered; the pages live on under this
    name until ``remove`` takes it away, so a second job (a shadow) can read the same PCM later.
    Raises ``InvalidAudio`` when the segment is already gone or is not one of ``prefix``'s.
    """
    if not name.startswith(prefix) or owner_pid(name) is None:
        raise InvalidAudio(f"shared-memory segment {name!r} is not one of this hub's (names start with {prefix!r})")
    shared = f"{prefix}{os.getpid()}_{secrets.token_hex(8)}"
    try:
        os.link(SHM_DIR / name, SHM_DIR / shared)
    except OSError as exc:
        raise InvalidAudio(f"shared-memory segment {name!r} cannot be shared: {exc.strerror}") from None
    return shared


def remove(name: str) -> bool:
    """Unlink a segment by name; False when it was already gone."""
    return _unlink(name)


def _remove_registered(name: str) -> None:
    """Unlink a segment this process made, and take it off the resource tracker's list whether or not it got
    there (the tracker registers a segment at the end of its creation; attaching registers it again, once)."""
    try:
        segment = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()


def create_probe() -> tuple[PcmSegment, str]:
    """A small segment holding a random nonce; the supervisor reads it to prove it shares our /dev/shm."""
    nonce = secrets.token_hex(16)
    return PcmSegment(hub_prefix(PROBE_TAG), nonce.encode()), nonce


def check_probe(name: str, nonce: str) -> bool:
    """True when the named probe segment exists here and holds ``nonce``."""
    if not name.startswith(hub_prefix(PROBE_TAG)) or owner_pid(name) is None:
        return False
    try:
        return _read_bytes(name, len(nonce)) == nonce.encode()
    except InvalidAudio:
        return False


def list_segments(prefix: str = ROOT) -> list[str]:
    """Names of the segments under ``prefix`` that exist now."""
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _unlink(name: str) -> bool:
    try:
        (SHM_DIR / name).unlink()
    except FileNotFoundError:
        return False
    return True


def sweep_orphans() -> list[str]:
    """Remove every segment of ours whose creating process is gone; return their names."""
    removed = []
    for name in list_segments():
        pid = owner_pid(name)
        if pid is not None and not _pid_alive(pid) and _unlink(name):
            removed.append(name)
    return removed


def remove_all(prefix: str) -> list[str]:
    """Remove every segment under ``prefix`` (a hub's own, at shutdown)."""
    return [name for name in list_segments(prefix) if _unlink(name)]
