"""The asyncio session client hands its events out in the order the hub sent them, whichever of its tasks (a
sender draining the inbox, a reader waiting on it) takes each message in."""

from __future__ import annotations

import asyncio

from hub.client.session import AsyncStreamSession
from hub.protocol import Message, MsgType


def _segment(word: str, at: float) -> Message:
    body = {"start": at, "end": at + 0.5, "text": word, "words": []}
    return Message(MsgType.SEGMENT, "r1", body, None)


async def _sent(frames: list[bytes]) -> None:
    return None


def test_a_message_the_reader_took_is_handled_before_those_a_sender_drains_after_it() -> None:
    async def scenario() -> list[str]:
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        session = AsyncStreamSession(_sent, inbox, "r1", None, 5.0, lambda _: None)
        reader = asyncio.ensure_future(session._await_change(None))  # a reader waiting for the next message
        await asyncio.sleep(0)
        inbox.put_nowait(_segment(" a10", 0.0))
        await asyncio.sleep(0)  # the reader's getter takes the first message; the reader has not run since
        inbox.put_nowait(_segment(" a30", 1.0))
        session._drain()  # a sender drains the inbox before the reader runs again
        await reader
        return [event.text for event in session._core.events]

    assert asyncio.run(scenario()) == [" a10", " a30"]
