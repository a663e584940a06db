"""``wait_ready`` retries a STATUS that got no answer within its try (a slow first STATUS on a busy machine)
until its own deadline (``AsyncHubClient.wait_ready`` runs the same ``Readiness`` loop)."""

from __future__ import annotations

from typing import Any

import pytest

from hub.client import HubClient
from hub.errors import HubError, JobTimeout

READY = {"hub": {"ready": True, "shutting_down": False}, "providers": {}}


def test_a_status_without_an_answer_is_tried_again() -> None:
    answers: list[Any] = [JobTimeout("no answer within 0.0 s"), JobTimeout("again"), READY]

    class Slow(HubClient):
        def status(self, timeout: float | None = None) -> dict[str, Any]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    with Slow("tcp://127.0.0.1:9", timeout=1.0) as client:
        assert client.wait_ready(timeout=5.0) == READY
    assert not answers


def test_no_answer_at_all_ends_as_the_hub_not_answering_not_as_a_timeout() -> None:
    class Silent(HubClient):
        def status(self, timeout: float | None = None) -> dict[str, Any]:
            raise JobTimeout("no answer")

    with Silent("tcp://127.0.0.1:9", timeout=1.0) as client, pytest.raises(HubError) as caught:
        client.wait_ready(timeout=0.3)
    assert caught.value.code == "HUB_UNREACHABLE", caught.value
