import random

from bench.trend import DAY_S, Trend, day_verdicts, fit, fit_floors, floors


def test_a_flat_series_has_no_slope_and_passes() -> None:
    trend = fit([(float(t), 50.0) for t in range(0, 1800, 10)])
    assert trend is not None and trend.per_hour == 0.0 and trend.start == 50.0
    assert all(v.ok for v in day_verdicts("supervisor", trend, trend, None))


def test_a_steady_leak_is_measured_and_projected() -> None:
    points = [(float(t), 100.0 + t / 3600.0) for t in range(0, 1800, 10)]  # 1 MiB an hour
    trend = fit(points)
    assert trend is not None and abs(trend.per_hour - 1.0) < 1e-9 and abs(trend.start - 100.0) < 1e-9
    assert abs(trend.projected() - 24.0) < 1e-6 and abs(trend.growth_fraction() - 0.24) < 1e-9
    (rss,) = day_verdicts("supervisor", trend, None, None)
    assert not rss.ok and "+24.0%" in rss.figure


def test_the_settling_minutes_are_left_out() -> None:
    warm = [(float(t), 40.0 + t / 30.0) for t in range(0, 300, 10)]  # fills for five minutes, then flat
    flat = [(float(t), 50.0) for t in range(300, 1800, 10)]
    assert fit(warm + flat).per_hour > 1.0  # type: ignore[union-attr]
    settled = fit(warm + flat, settle_s=300)
    assert settled is not None and settled.per_hour == 0.0


def test_one_descriptor_a_day_fails_and_too_few_samples_is_no_verdict() -> None:
    per_hour = 2.0 / 24.0
    fds = fit([(t, 30 + per_hour * t / 3600.0) for t in (0.0, 600.0, 1200.0, 1800.0)])
    assert fds is not None and abs(fds.projected() - 2.0) < 1e-9
    assert [v.ok for v in day_verdicts("gateway", None, fds, None)] == [False]
    assert fit([(0.0, 1.0), (1.0, 2.0)]) is None and fit([]) is None
    assert Trend(start=0.0, per_hour=1.0, samples=3).growth_fraction() == 0.0 and DAY_S == 86400.0


def test_readings_raised_by_work_in_flight_do_not_make_a_slope() -> None:
    # 23 descriptors held, plus 0-8 more at random moments (connections opening, a worker being replaced),
    # weighted towards the end of the run: a line through every reading climbs, one through the floors does not
    rng = random.Random(7)
    points = [
        (float(t), 23.0 + (rng.randint(0, 8) if rng.random() < 0.2 + t / 3600 else 0)) for t in range(0, 2700, 10)
    ]
    assert fit(points, settle_s=600).projected() > 1.0  # type: ignore[union-attr]
    held = fit_floors(points, settle_s=600)
    assert held is not None and held.projected() == 0.0 and held.start == 23.0
    assert all(v.ok for v in day_verdicts("supervisor", None, held, held))


def test_a_leak_raises_the_floors() -> None:
    points = [
        (float(t), 23.0 + t // 600 + (3 if t % 70 == 0 else 0)) for t in range(0, 2700, 10)
    ]  # one more every 10 min
    leak = fit_floors(points, settle_s=600)
    assert leak is not None and 5.0 < leak.per_hour < 7.0
    assert [v.ok for v in day_verdicts("supervisor", None, leak, None)] == [False]


def test_floors_are_each_windows_lowest_reading_at_its_time() -> None:
    points = [(0.0, 5.0), (100.0, 3.0), (299.0, 4.0), (300.0, 9.0), (450.0, 8.0), (600.0, 1.0), (900.0, 2.0)]
    assert floors(points, 300.0) == [(100.0, 3.0), (450.0, 8.0), (600.0, 1.0)]  # 900 s falls in the last window
    assert floors(points[:4], 300.0) == [(0.0, 5.0), (100.0, 3.0), (299.0, 4.0)]  # a short span: three windows
    assert floors([]) == [] and fit_floors([], 0.0) is None and fit_floors([(0.0, 1.0)], 0.0) is None


def test_a_short_run_still_has_floors_to_fit() -> None:
    for last in (51, 61):  # a 60 s run: readings 10 s apart, the first 20 s left out
        points = [(float(t), 60.0 + t / 3600.0) for t in range(0, last, 10)]
        trend = fit_floors(points, settle_s=20.0)
        assert trend is not None and trend.samples == 3 and abs(trend.per_hour - 1.0) < 1e-6
