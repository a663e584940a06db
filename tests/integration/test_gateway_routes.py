"""The gateway and gray release: a route is a model name, and the caller's route_key (a form field or the
X-Route-Key header) keeps it on one version of a sticky route."""

from __future__ import annotations

import io
import json
import wave

import numpy as np
import openai
import pytest

from hub.supervisor.release import routes
from tests.conftest import wait_for
from tests.gateway_support import Gateway

pytestmark = pytest.mark.timeout(120)


def _wav() -> bytes:
    pcm = (0.1 * np.sin(np.linspace(0, 2000, 16000)) * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


def test_a_sticky_route_through_the_openai_api(gateway_factory) -> None:
    gw: Gateway = gateway_factory(
        {"v1": {"type": "echo"}, "v2": {"type": "echo", "options": {"fail": "the canary", "fail_from": 2}}},
        routes={
            "asr": {"providers": [{"provider": "v1", "weight": 1}, {"provider": "v2", "weight": 1}], "sticky": True}
        },
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    wait_for(lambda: "asr" in [m.id for m in client.models.list().data], what="the route among the models")
    assert client.models.retrieve("asr").id == "asr"
    audio = _wav()
    for i in range(12):
        key = f"user-{i}"
        expected_ok = routes.sticky_pick({"v1": 1, "v2": 1}, key) == "v1"  # v2 fails every request
        for extra in ({"extra_body": {"route_key": key}}, {"extra_headers": {"X-Route-Key": key}}):
            try:
                text = client.audio.transcriptions.create(model="asr", file=("a.wav", audio), **extra).text
                # a v2 key may still be answered: while v2's worker is replaced after its failures in a row it has
                # no ready worker, and the route sends its keys to v1 meanwhile
                assert text.startswith("echo 1.000s"), (key, text)
            except openai.APIStatusError as exc:
                assert not expected_ok, (key, exc)
                assert "the canary" in json.dumps(exc.body)
    counts = gw.hub.status()["routes"]["asr"]["providers"]
    assert counts["v1"]["requests"] + counts["v2"]["requests"] == 24 and counts["v2"]["requests"] > 0
    assert counts["v2"]["errors"] == counts["v2"]["requests"] and counts["v1"]["errors"] == 0
