"""A long upload through the OpenAI-compatible gateway is split across the pool with no change to the gateway:
``verbose_json`` segments and ``stream=true`` deltas in time order; the form field ``split=false`` keeps it whole."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import openai
import pytest

from tests.gateway_support import Gateway
from tests.integration.test_long_audio import SPLIT, pieces_sent, talk
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(120)


def sdk(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_long_upload_is_split_and_split_false_keeps_it_whole(gateway_factory: object, tmp_path: Path) -> None:
    gw: Gateway = gateway_factory({"echo": {"type": "echo", "pool": {"min_size": 2, "max_size": 2, **SPLIT}}})  # type: ignore[operator]
    path = tmp_path / "talk.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes((np.clip(talk(), -1, 1) * 32767).astype("<i2").tobytes())
    client = sdk(gw)
    with path.open("rb") as audio:
        verbose = client.audio.transcriptions.create(model="echo", file=audio, response_format="verbose_json")
    sent = pieces_sent()
    # the 16-bit wav differs from the float clips in the last digit of an RMS: compare where the pieces lie
    assert [(s.start, s.end) for s in verbose.segments] == [(a, b) for a, b, _ in sent]  # type: ignore[union-attr]
    with path.open("rb") as audio:
        events = list(client.audio.transcriptions.create(model="echo", file=audio, stream=True))
    deltas = [e.delta.strip() for e in events[:-1]]  # type: ignore[union-attr]
    assert len(deltas) == len(sent) and [d.split()[1] for d in deltas] == [
        t.split()[1] for *_, t in sent
    ]  # in time order
    with path.open("rb") as audio:
        whole = client.audio.transcriptions.create(
            model="echo", file=audio, response_format="verbose_json", extra_body={"split": "false"}
        )
    assert len(whole.segments) == 1 and whole.text.startswith(echo_text(talk()).split(" rms")[0])  # type: ignore[union-attr]
    with path.open("rb") as audio, pytest.raises(openai.BadRequestError, match="split must be true or false"):
        client.audio.transcriptions.create(model="echo", file=audio, extra_body={"split": "maybe"})
