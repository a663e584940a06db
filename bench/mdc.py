"""An M/D/c queue simulated on a given arrival trace: the p99 a perfect dispatcher would give.

"p99 at 80 % load" is judged against this, not against the unloaded latency: with Poisson
arrivals even an ideal first-come-first-served dispatcher over ``c`` workers queues, and its p99
at 80 % load is several service times. The simulation takes the very arrival times the
benchmark used and a constant service time (the measured one), so the hub's p99 over the
simulated p99 is what the hub's own dispatching added.
"""

from __future__ import annotations

import heapq

import numpy as np


def simulate(arrivals: list[float], service_s: float, servers: int) -> list[float]:
    """Latency of each request (finish minus arrival) with FIFO dispatch to the first free of ``servers``."""
    free_at = [0.0] * servers
    latencies = []
    for at in sorted(arrivals):
        start = max(at, heapq.heappop(free_at))
        heapq.heappush(free_at, start + service_s)
        latencies.append(start + service_s - at)
    return latencies


def p99(arrivals: list[float], service_s: float, servers: int) -> float:
    return float(np.percentile(simulate(arrivals, service_s, servers), 99))
