"""The load helpers of tests/conftest.py must not miss a failure: an exception in a load thread is counted,
and a thread still running when the load stops fails the test."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.conftest import repeating, required_tool


def test_every_exception_is_counted() -> None:
    calls = iter(range(1_000_000))

    def one() -> str:
        if next(calls) == 3:
            raise ValueError("the fourth call broke")
        return "ok"

    with repeating(one, threads=1) as outcomes:
        while "ValueError: the fourth call broke" not in outcomes:
            threading.Event().wait(0.01)
    assert outcomes == Counter({"ok": 3, "ValueError: the fourth call broke": 1})


def test_a_thread_still_running_fails_the_test() -> None:
    release = threading.Event()
    started = threading.Event()

    def one() -> str:
        started.set()
        release.wait(30)
        return "ok"

    try:
        with pytest.raises(AssertionError, match="still hanging"):
            with repeating(one, threads=2, join_timeout=0.2):
                assert started.wait(10)
    finally:
        release.set()


def test_a_missing_tool_skips_on_a_developers_run_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ASR_HUB_REQUIRE_EXTRAS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="promtool is not installed"):
        required_tool("promtool", "apt-get install prometheus")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI and `make test`"):
        required_tool("promtool", "apt-get install prometheus")
