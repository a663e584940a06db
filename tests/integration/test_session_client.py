"""A live session's client side: the audio it sends, its asyncio waiting, and a hub that takes nothing."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

from hub.audio import resample
from hub.client.session import AsyncStreamSession, ChunkAudio
from hub.errors import HubUnreachable, InvalidAudio
from hub.protocol import Message, MsgType
from tests.conftest import echo_provider, wait_for
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(60)


def streamed(audio: ChunkAudio, chunks: list, rate: int) -> np.ndarray:
    return np.concatenate([*(audio.pcm(c, sample_rate=rate) for c in chunks), audio.flush()])


@pytest.mark.parametrize("rate", [44100, 48000])
@pytest.mark.parametrize("chunk", [1, 127, 4096])
def test_chunks_of_any_size_give_the_samples_of_a_whole_file_resample(rate: int, chunk: int) -> None:
    pcm = (0.3 * np.random.default_rng(chunk).standard_normal(rate // 2 + 33)).astype(np.float32)
    whole = resample(pcm, rate)
    sent = streamed(ChunkAudio(), [pcm[i : i + chunk] for i in range(0, pcm.size, chunk)], rate)
    assert sent.size == whole.size
    np.testing.assert_allclose(sent, whole, atol=1e-6)


def test_raw_bytes_chunks_split_anywhere_on_sample_boundaries_match_too() -> None:
    ints = (np.sin(np.linspace(0, 500, 4800)) * 20000).astype(np.int16)
    raw = ints.tobytes()
    sent = streamed(ChunkAudio(), [raw[i : i + 254] for i in range(0, len(raw), 254)], 48000)
    np.testing.assert_allclose(sent, resample(ints.astype(np.float32) / 32768, 48000), atol=1e-6)


def test_16k_chunks_pass_through_and_a_change_of_rate_is_refused() -> None:
    audio = ChunkAudio()
    pcm = np.linspace(-0.5, 0.5, 1000, dtype=np.float32)
    assert np.array_equal(audio.pcm(pcm, None), pcm) and audio.pcm(b"", None).size == 0
    with pytest.raises(InvalidAudio, match="began at 16000 Hz, this chunk says 48000 Hz"):
        audio.pcm(pcm, 48000)
    with pytest.raises(InvalidAudio, match="numpy array or raw 16-bit PCM bytes, got list"):
        ChunkAudio().pcm([0.1, 0.2], None)  # type: ignore[arg-type]
    assert audio.flush().size == 0


def test_a_cancelled_reader_leaves_no_getter_to_steal_the_next_message() -> None:
    """A task cancelled while it waits in results() must not leave an inbox reader behind: that reader
    would take the next message and drop it, and the session would never see it."""

    async def main() -> None:
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        async def send(frames: list[bytes]) -> None:
            return None

        session = AsyncStreamSession(send, inbox, "7", None, 5.0, lambda s: None)
        waiting = asyncio.ensure_future(session.results().__anext__())
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        inbox.put_nowait(Message(MsgType.PARTIAL, "7", {"text": "hello", "read": 0}))
        await asyncio.sleep(0.05)  # a getter left behind would have taken it by now
        event = await asyncio.wait_for(session.results().__anext__(), 2)
        assert event.text == "hello"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_session_whose_hub_takes_nothing_ends_at_its_timeout(hub_factory) -> None:
    """A stopped hub (SIGSTOP) takes no message: once the socket's queue is full, a send waits the session's
    timeout, not forever, and the session ends with HUB_UNREACHABLE; the hub carries on once resumed."""
    hub = hub_factory({"echo": echo_provider(session_idle_timeout=2)})  # the hub lets go of the abandoned session
    with hub.client(use_shm=False, timeout=2) as client:
        session = client.open_stream()
        hub.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(HubUnreachable, match="took no message"):
                for _ in range(100_000):  # 100 samples each: the socket's 1,000 messages and the kernel's buffers fill
                    session.send(np.zeros(100, np.float32))
            assert time.monotonic() - started < 30
            with pytest.raises(HubUnreachable):
                session.close()  # over: nothing more is sent
        finally:
            hub.proc.send_signal(signal.SIGCONT)
        # the resumed hub has work to catch up on first (the chunks queued in this client's socket; workers whose
        # heartbeats it missed while stopped): once, in a loaded make test, that took longer than the session's
        # 2 s, so the request that shows the hub carries on gets a wait of its own
        answer = client.transcribe(np.zeros(1600, np.float32), timeout=30)
        assert answer.text == echo_text(np.zeros(1600, np.float32))
    wait_for(lambda: hub.status()["providers"]["echo"]["sessions"] == 0, 20, "the hub to close the abandoned session")
