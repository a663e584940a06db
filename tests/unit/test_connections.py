"""A listener's connection limits as pure bookkeeping on a fake clock: the header deadline and the cap."""

from __future__ import annotations

import pytest

from hub.connections import ConnectionGuard, ConnectionLimits


def guard(header_timeout: float = 10.0, max_connections: int = 3) -> ConnectionGuard[str]:
    return ConnectionGuard(ConnectionLimits(header_timeout, max_connections))


def test_a_connection_whose_headers_are_late_is_overdue_once() -> None:
    g = guard()
    g.opened("a", now=0.0)
    g.opened("b", now=4.0)
    assert g.overdue(9.9) == []
    assert g.overdue(10.0) == ["a"]
    assert g.overdue(13.9) == []  # named once; the server closes it and reports it closed
    assert g.overdue(14.0) == ["b"]
    assert g.open_count == 2 and g.waiting_count == 0
    g.closed("a")
    g.closed("b")
    assert g.open_count == 0


def test_headers_in_time_stop_the_clock_until_the_next_request() -> None:
    g = guard()
    g.opened("a", now=0.0)
    g.done("a")
    assert g.overdue(100.0) == []  # a long upload or a live WebSocket is not a late header
    g.waiting("a", now=100.0)  # kept alive: the next request's first bytes
    assert g.overdue(109.0) == []
    assert g.overdue(110.0) == ["a"]


def test_at_the_cap_a_new_connection_displaces_the_longest_waiting() -> None:
    g = guard(max_connections=3)
    for i, key in enumerate("abc"):
        g.opened(key, now=float(i))
    g.done("b")
    admission = g.opened("d", now=5.0)
    assert admission.admitted and admission.evicted == "a"
    assert g.opened("e", now=6.0).evicted == "c"  # "b" is serving a request: never displaced
    assert g.open_count == 3 and g.overdue(1000.0) == ["d", "e"]


def test_at_the_cap_with_every_connection_busy_a_new_one_is_refused() -> None:
    g = guard(max_connections=2)
    for key in "ab":
        g.opened(key, now=0.0)
        g.done(key)
    admission = g.opened("c", now=1.0)
    assert not admission.admitted and admission.evicted is None
    assert g.open_count == 2
    g.closed("a")
    assert g.opened("c", now=2.0).admitted


def test_waiting_ignores_a_connection_already_closed_or_refused() -> None:
    g = guard()
    g.waiting("ghost", now=0.0)
    g.closed("ghost")
    assert g.open_count == 0 and g.overdue(100.0) == []


@pytest.mark.parametrize("timeout, cap", [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_limits_must_be_positive(timeout: float, cap: int) -> None:
    with pytest.raises(ValueError):
        ConnectionLimits(timeout, cap)


def test_the_sweep_runs_often_enough_for_short_deadlines() -> None:
    assert ConnectionLimits(0.5, 1).sweep_interval == pytest.approx(0.05)
    assert ConnectionLimits(60.0, 1).sweep_interval == 1.0
