"""The gateway's memory budget for uploads (``gateway.max_buffered_mb``): twelve concurrent 25-minute WAV uploads
(48 MB each) stay within it, the gateway's resident memory comes back near its baseline afterwards, and an upload
that does not fit is refused with 429 and ``Retry-After`` before its body is read.

The hub behind the gateway runs the echo worker, which answers at once: what is measured is the gateway's own
memory, and tiny.en would take minutes per 25-minute upload on this machine's two cores."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hub.audio import upload_peak_bytes
from hub.protocol import SAMPLE_RATE
from tests.conftest import wait_for
from tests.gateway_support import Gateway, serving

pytestmark = pytest.mark.timeout(300)

# long uploads of a tone: splitting them (pool.split_over_seconds) would find no speech to decode, and this
# file measures the gateway, not the split
ECHO = {"echo": {"type": "echo", "pool": {"min_size": 2, "max_size": 2, "split_over_seconds": 0}}}
MB = 2**20


def wav_file(path: Path, seconds: float) -> Path:
    """A mono 16-bit WAV at 16 kHz (a 25-minute one is 48 MB), written a minute at a time."""
    rng = np.random.default_rng(7)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        left = int(seconds * SAMPLE_RATE)
        while left:
            n = min(left, 60 * SAMPLE_RATE)
            w.writeframes((rng.normal(0, 3000, n)).astype("<i2").tobytes())
            left -= n
    return path


def multipart(path: Path, model: str = "echo") -> tuple[bytes, bytes, str]:
    """The head and tail of a form with ``path`` as its file (the file's bytes go between), and its content type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    return head, f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(port: int, path: Path) -> tuple[int, dict[str, str], bytes]:
    """POST the file as the openai SDK does (one multipart body with a Content-Length); status, headers, body."""
    head, tail, content_type = multipart(path)
    size = path.stat().st_size
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", "/v1/audio/transcriptions")
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(len(head) + size + len(tail)))
        conn.endheaders()
        conn.send(head)
        with open(path, "rb") as audio:
            while block := audio.read(MB):
                conn.send(block)
        conn.send(tail)
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    except (BrokenPipeError, ConnectionResetError):  # refused before the whole body was sent: read what it said
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak since the process started) in bytes; shared-memory pages it wrote count in both."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return wav_file(tmp_path_factory.mktemp("wav") / "long.wav", 25 * 60)


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with the default budget (512 MB) and room to wait in it for as long as the test takes."""
    with serving(tmp_path_factory.mktemp("budget"), ECHO, max_buffer_wait=120) as gw:
        yield gw


def test_twelve_concurrent_48_mb_uploads_stay_within_the_budget(
    budgeted: Gateway, long_wav: Path, tmp_path: Path
) -> None:
    assert long_wav.stat().st_size == 48_000_044  # 48 MB: 25 minutes of 16-bit samples at 16 kHz and a header
    pid = budgeted.hub.status()["gateway"]["pid"]
    assert upload(budgeted.port, wav_file(tmp_path / "short.wav", 2))[0] == 200  # warm: what one request keeps
    baseline = memory(pid)["VmRSS"]
    results: list[tuple[int, dict[str, str], bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(upload(budgeted.port, long_wav))) for _ in range(12)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    elapsed = time.monotonic() - started
    assert len(results) == 12, "an upload hung"
    assert [status for status, _, _ in results] == [200] * 12, [body[:200] for _, _, body in results]
    assert all(json.loads(body)["text"].startswith("echo 1500.000s") for _, _, body in results)
    peak = memory(pid)["VmHWM"]
    budget = 512 * MB
    print(f"gateway RSS: baseline {baseline / MB:.0f} MB, peak {peak / MB:.0f} MB, 12 uploads in {elapsed:.1f} s")
    # the budget counts uploads and their PCM; the rest is Python's and the server's own working memory
    assert peak - baseline <= budget + 96 * MB, f"peak {peak / MB:.0f} MB over a baseline of {baseline / MB:.0f} MB"
    wait_for(
        lambda: memory(pid)["VmRSS"] <= baseline + 48 * MB, 20, f"RSS back near {baseline / MB:.0f} MB: {memory(pid)}"
    )
    assert memory(pid)["RssShmem"] < 8 * MB, "segments of finished requests are still mapped"


def test_an_upload_that_does_not_fit_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    """max_upload_mb 10 needs 30 MB of budget (the upload and its PCM), max_buffered_mb 40 holds one; no waiting."""
    clip = wav_file(tmp_path / "five-minutes.wav", 5 * 60)  # 9.6 MB
    with serving(tmp_path, ECHO, max_upload_mb=10, max_buffered_mb=40, max_buffer_wait=0) as gw:
        head, tail, content_type = multipart(clip)
        size = len(head) + clip.stat().st_size + len(tail)
        holder = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        holder.putrequest("POST", "/v1/audio/transcriptions")
        holder.putheader("Content-Type", content_type)
        holder.putheader("Content-Length", str(size))
        holder.endheaders()
        holder.send(head)  # its room is reserved from the Content-Length: the rest of its body can come later
        wait_for(
            lambda: _buffered(gw) == upload_peak_bytes(size, 1800), 10, "the first upload's reservation, all of it"
        )

        refused = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        refused.putrequest("POST", "/v1/audio/transcriptions")
        refused.putheader("Content-Type", content_type)
        refused.putheader("Content-Length", str(size))
        refused.endheaders()
        refused.send(head)  # and not a byte of its audio
        reply = refused.getresponse()
        assert reply.status == 429 and reply.getheader("Retry-After") == "1"
        assert "gateway.max_buffered_mb" in json.loads(reply.read())["error"]["message"]
        refused.close()

        with open(clip, "rb") as audio:
            holder.send(audio.read())
        holder.send(tail)
        answer = holder.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["text"].startswith("echo 300.000s")
        holder.close()
        wait_for(lambda: _buffered(gw) == 0, 10, "the budget empty again")
        assert upload(gw.port, clip)[0] == 200  # the refused one, retried, fits now


def test_a_chunked_upload_counts_as_it_is_read(tmp_path: Path) -> None:
    """Without a Content-Length the budget grows with what has been read: past it, 429 before the rest is read."""
    clip = wav_file(tmp_path / "five-minutes.wav", 5 * 60)
    with serving(tmp_path, ECHO, max_upload_mb=10, max_buffered_mb=31, max_buffer_wait=0) as gw:
        head, tail, content_type = multipart(clip)
        data = clip.read_bytes()
        assert _chunked(gw.port, content_type, [head, data, tail]) == 200  # alone it fits
        holder = _open_chunked(gw.port, content_type, [head, data[: 8 * MB]])  # holds 3 x 8 MB of room
        wait_for(lambda: _buffered(gw) >= upload_peak_bytes(8 * MB, 1800), 10, "the first upload's reservation")
        assert _chunked(gw.port, content_type, [head, data, tail]) == 429
        holder.close()


def test_an_upload_that_stalls_gives_its_room_back(tmp_path: Path) -> None:
    """A body that stops coming for gateway.header_timeout seconds is answered 408 and its reservation freed."""
    clip = wav_file(tmp_path / "ten-seconds.wav", 10)
    with serving(tmp_path, ECHO, header_timeout=1) as gw:
        head, tail, content_type = multipart(clip)
        stalled = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        stalled.putrequest("POST", "/v1/audio/transcriptions")
        stalled.putheader("Content-Type", content_type)
        stalled.putheader("Content-Length", str(len(head) + clip.stat().st_size + len(tail)))
        stalled.endheaders()
        stalled.send(head)  # and then nothing
        started = time.monotonic()
        reply = stalled.getresponse()
        assert reply.status == 408 and "gateway.header_timeout" in json.loads(reply.read())["error"]["message"]
        assert time.monotonic() - started < 5
        stalled.close()
        wait_for(lambda: _buffered(gw) == 0, 10, "the budget empty again")
        assert upload(gw.port, clip)[0] == 200


def _buffered(gw: Gateway) -> float:
    """The gateway's asr_hub_gateway_buffered_bytes."""
    _, page = gw.get("/metrics")
    (line,) = [line for line in page.splitlines() if line.startswith("asr_hub_gateway_buffered_bytes ")]
    return float(line.split()[1])


def _open_chunked(port: int, content_type: str, pieces: list[bytes]) -> http.client.HTTPConnection:
    """A chunked POST with ``pieces`` sent (in chunks of a megabyte), not yet ended."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/audio/transcriptions")
    conn.putheader("Content-Type", content_type)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for piece in pieces:
            for start in range(0, len(piece), MB):
                block = piece[start : start + MB]
                conn.send(f"{len(block):x}\r\n".encode() + block + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused while the body was still coming: the answer is there to read
    return conn


def _chunked(port: int, content_type: str, pieces: list[bytes]) -> int:
    conn = _open_chunked(port, content_type, pieces)
    try:
        conn.send(b"0\r\n\r\n")  # the empty chunk ends the body
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        return conn.getresponse().status
    finally:
        conn.close()
