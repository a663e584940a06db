"""The M/D/c reference the benchmark's p99 at 80 % load is judged against."""

from __future__ import annotations

import pytest

from bench import load, mdc

pytestmark = pytest.mark.timeout(30)


def test_requests_that_never_overlap_take_the_service_time() -> None:
    assert mdc.simulate([0.0, 1.0, 2.0], 0.5, 1) == [0.5, 0.5, 0.5]


def test_a_burst_queues_first_come_first_served_on_the_free_servers() -> None:
    assert mdc.simulate([0.0, 0.0, 0.0, 0.0], 1.0, 2) == [1.0, 1.0, 2.0, 2.0]


def test_p99_at_80_percent_load_is_several_service_times() -> None:
    arrivals = load.arrivals(rate=0.8 * 2 / 0.6, jobs=5000, seed=7)  # 80 % of two servers of 0.6 s
    p99 = mdc.p99(arrivals, 0.6, 2)
    assert 3 * 0.6 < p99 < 10 * 0.6
