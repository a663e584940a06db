"""The supervisor's signal table, without processes: each handled signal has its ``handle_<name>``, and the
loop's dispatch calls them in the order the signals came (gunicorn's arbiter; uvicorn drives its supervisor
the same way, by appending to the signal queue)."""

from __future__ import annotations

import signal
import time
from collections import deque
from types import SimpleNamespace

import pytest

from hub.supervisor.loop import SIGNALS, Supervisor, handler_name

pytestmark = pytest.mark.timeout(10)


class FakeFarm:
    """What the signal handlers may touch of the farm: its public surface only."""

    def __init__(self) -> None:
        self.stopping = False
        self.config = SimpleNamespace(hub=SimpleNamespace(drain_timeout=30.0))

    def begin_shutdown(self) -> None:
        self.stopping = True


class FakeWorkforce:
    """What the signal handlers may touch of the workforce: the pools' sizes."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def step_sizes(self, step: int, now: float) -> None:
        self.steps.append(step)


class FakeSessions:
    """What the signal handlers may touch of the live sessions: closing them all."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def close_all(self, reason: str, now: float) -> None:
        self.closed.append(reason)


def supervisor() -> Supervisor:
    """A supervisor with no socket and no process: only what the signal handlers read."""
    sup = Supervisor.__new__(Supervisor)
    sup.farm = FakeFarm()  # type: ignore[assignment]
    sup.workforce = FakeWorkforce()  # type: ignore[assignment]
    sup.sessions = FakeSessions()  # type: ignore[assignment]
    sup.sig_queue = deque()
    sup.shutdown_deadline = 0.0
    sup.config_path = None
    return sup


def test_handler_names_follow_the_signal_names() -> None:
    assert handler_name(signal.SIGTERM) == "handle_term"
    assert handler_name(signal.SIGTTIN) == "handle_ttin"


@pytest.mark.parametrize("name", SIGNALS)
def test_every_handled_signal_has_its_handler(name: str) -> None:
    assert callable(getattr(Supervisor, handler_name(getattr(signal, f"SIG{name}"))))


def test_ttin_and_ttou_step_every_pool_by_one() -> None:
    sup = supervisor()
    sup.sig_queue.extend([signal.SIGTTIN, signal.SIGTTIN, signal.SIGTTOU])
    sup.handle_signals()
    assert sup.workforce.steps == [1, 1, -1]  # type: ignore[attr-defined]
    assert not sup.sig_queue


def test_term_starts_a_shutdown_and_a_second_signal_ends_its_wait() -> None:
    sup = supervisor()
    sup.sig_queue.append(signal.SIGTERM)
    sup.handle_signals()
    assert sup.farm.stopping
    assert sup.shutdown_deadline == pytest.approx(time.monotonic() + 30.0, abs=1.0)
    assert sup.sessions.closed == ["the hub is shutting down"]  # type: ignore[attr-defined]
    sup.sig_queue.append(signal.SIGINT)
    sup.handle_signals()
    assert sup.shutdown_deadline == 0.0


def test_hup_without_a_config_file_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    sup = supervisor()
    sup.sig_queue.append(signal.SIGHUP)
    sup.handle_signals()
    assert "SIGHUP ignored" in caplog.text
    assert not sup.farm.stopping and not sup.workforce.steps  # type: ignore[attr-defined]
