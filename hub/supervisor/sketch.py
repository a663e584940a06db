"""A relative-error quantile sketch (after DDSketch, Masson et al., VLDB 2019).

A value ``v > 0`` is counted in bin ``ceil(log(v) / log(gamma))`` with
``gamma = (1 + a) / (1 - a)``; every value in a bin lies within ``a`` (relative) of the
bin's representative ``2 gamma^i / (gamma + 1)``, so any quantile read from the bins is
within ``a`` of a true sample at that rank, whatever the distribution. Adding is O(1)
(one logarithm, one dict update) and the bins stay few: at ``a = 1 %`` one decade takes
115 bins and only those that were hit are stored. Zero and negative values (a wait of
0 s) are counted apart and read back as 0.
"""

from __future__ import annotations

import math

_log, _ceil = math.log, math.ceil  # bound once: add() runs twice per request in the supervisor
RELATIVE_ACCURACY = 0.01  # percentiles read within 1 %, comfortably inside the 2 % the status promises
ZERO_INDEX = -(2**31)  # the "bin" of zero and negative values: below every real bin (log of the least float is ~ -745)


class QuantileSketch:
    """Counts of values by logarithmic bin; quantiles within ``accuracy`` relative error."""

    __slots__ = ("accuracy", "_gamma", "_inv_log_gamma", "bins", "zeros", "count", "sum")

    def __init__(self, accuracy: float = RELATIVE_ACCURACY) -> None:
        if not 0.0 < accuracy < 1.0:
            raise ValueError(f"accuracy must lie in (0, 1), got {accuracy}")
        self.accuracy = accuracy
        self._gamma = (1.0 + accuracy) / (1.0 - accuracy)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self.bins: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.sum = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value <= 0.0:
            self.zeros += 1
            return
        i = _ceil(_log(value) * self._inv_log_gamma)  # self.index(value), inlined: this is the hot path
        bins = self.bins
        bins[i] = bins.get(i, 0) + 1

    def quantile(self, q: float) -> float | None:
        """The value at rank ``q * (count - 1)`` (0-based, the lower sample), or None when empty."""
        if not self.count:
            return None
        rank = q * (self.count - 1)
        seen = self.zeros
        if rank < seen:
            return 0.0
        for i in sorted(self.bins):
            seen += self.bins[i]
            if seen > rank:
                return 2.0 * self._gamma**i / (self._gamma + 1.0)
        return 2.0 * self._gamma ** max(self.bins) / (self._gamma + 1.0)

    def index(self, value: float) -> int:
        """The bin ``value`` is counted in: bin ``i`` holds ``(gamma^(i-1), gamma^i]``; zero and below: ZERO_INDEX."""
        if value <= 0.0:
            return ZERO_INDEX
        return math.ceil(math.log(value) * self._inv_log_gamma)

    def upper(self, index: int) -> float:
        """The upper edge of bin ``index`` (0.0 for ZERO_INDEX)."""
        if index == ZERO_INDEX:
            return 0.0
        return float(self._gamma**index)

    def counts_through(self, indices: tuple[int, ...]) -> list[int]:
        """For each bin index (ascending), how many values lie in it or below (zeros included)."""
        ordered = sorted(self.bins.items())
        out, seen, k = [], self.zeros, 0
        for limit in indices:
            while k < len(ordered) and ordered[k][0] <= limit:
                seen += ordered[k][1]
                k += 1
            out.append(seen)
        return out
