"""The relative-error quantile sketch behind the status percentiles: checked against exact order statistics."""

from __future__ import annotations

import random

import pytest

from hub.supervisor.sketch import QuantileSketch

pytestmark = pytest.mark.timeout(30)


def _exact(sorted_values: list[float], q: float) -> float:
    return sorted_values[int(q * (len(sorted_values) - 1))]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(
    "draw",
    [
        lambda r: r.lognormvariate(-5.0, 2.0),  # latencies over five decades
        lambda r: r.expovariate(2.0),
        lambda r: 0.6 + r.random() * 0.01,  # nearly constant: a bucketed histogram reads this badly
    ],
)
def test_quantiles_within_one_percent_of_the_true_sample(seed: int, draw: object) -> None:
    rng = random.Random(seed)
    values = [draw(rng) for _ in range(5000)]  # type: ignore[operator]
    sketch = QuantileSketch()
    for v in values:
        sketch.add(v)
    values.sort()
    for q in (0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        assert sketch.quantile(q) == pytest.approx(_exact(values, q), rel=0.01)


def test_zeros_empty_and_bad_accuracy() -> None:
    sketch = QuantileSketch()
    assert sketch.quantile(0.5) is None
    for v in (0.0, 0.0, 0.0, 2.0):
        sketch.add(v)
    assert sketch.quantile(0.5) == 0.0 and sketch.quantile(1.0) == pytest.approx(2.0, rel=0.01)
    assert sketch.counts_through((sketch.index(1.0), sketch.index(2.0))) == [3, 4]
    with pytest.raises(ValueError):
        QuantileSketch(0.0)


def test_a_zero_bound_counts_only_the_zeros() -> None:
    """The WER histogram's first Prometheus bound is 0: a perfect agreement, counted apart from the bins."""
    from hub.supervisor.metrics import WER_BUCKETS, Histogram

    h = Histogram(WER_BUCKETS)
    for wer in (0.0, 0.0, 0.01, 0.3, 2.5):
        h.observe(wer)
    buckets = dict(h.cumulative())
    assert buckets["0.0"] == 2.0 and buckets["+Inf"] == 5.0
    assert [n for _, n in h.cumulative()] == sorted(n for _, n in h.cumulative())
