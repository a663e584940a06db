"""Bare ZeroMQ, no hub: the floor the hub's own overhead is measured against.

``echo``: one ROUTER that sends every message straight back (one hop: the target's
"bare ZeroMQ round trip"). ``broker`` + ``worker``: the hub's shape without its code,
a least-recently-used broker between a tcp frontend and an ipc backend (zguide's
lbbroker), so a request crosses two hops as it does in the hub. The hub's added latency
over ``echo`` splits into what the two-hop architecture costs (broker minus echo) and
what the hub's code costs (hub minus broker). Both client helpers send frames shaped
and sized like the SDK's own (version, type, id, JSON body).

Run as ``python -m bench.zmq_bare echo ENDPOINT`` | ``broker FRONTEND BACKEND`` | ``worker BACKEND``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque
from collections.abc import Callable

import zmq

READY = b"READY"
BODY = json.dumps(
    {
        "provider": "echo",
        "options": {},
        "stream": False,
        "timeout": 60.0,
        "audio": {"samples": 160, "shm": "asrhub_0123abcd_12345_0123456789abcdef"},
    }
).encode()


def request(n: int) -> list[bytes]:
    return [b"\x01", b"TRANSCRIBE", str(n).encode(), BODY]


def serve_echo(endpoint: str) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.bind(endpoint)
        while True:
            sock.send_multipart(sock.recv_multipart())


def serve_broker(frontend: str, backend: str) -> None:
    """Read the frontend only while a worker is idle: backpressure without a queue of our own."""
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as front, ctx.socket(zmq.ROUTER) as back:
        front.bind(frontend)
        back.bind(backend)
        idle: deque[bytes] = deque()
        poller = zmq.Poller()
        poller.register(back, zmq.POLLIN)
        while True:
            poller.register(front, zmq.POLLIN if idle else 0)
            events = dict(poller.poll())
            if back in events:
                worker, client, *frames = back.recv_multipart()
                idle.append(worker)
                if client != READY:
                    front.send_multipart([client, *frames])
            if front in events and idle:
                front_frames = front.recv_multipart()
                back.send_multipart([idle.popleft(), *front_frames])


def serve_worker(backend: str) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.connect(backend)
        sock.send_multipart([READY])
        while True:
            sock.send_multipart(sock.recv_multipart())


def round_trips(endpoint: str, count: int, warm: int = 200) -> list[float]:
    """Seconds each of ``count`` sequential request/reply round trips took (after ``warm`` unmeasured ones)."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        times = []
        for n in range(warm + count):
            sent = time.perf_counter()
            sock.send_multipart(request(n))
            sock.recv_multipart()
            times.append(time.perf_counter() - sent)
        return times[warm:]


def requests_per_s(endpoint: str, in_flight: int, seconds: float) -> float:
    """Replies per second with ``in_flight`` requests kept outstanding (each reply sends the next)."""
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        for n in range(in_flight):
            sock.send_multipart(request(n))
        done = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            sock.recv_multipart()
            done += 1
            sock.send_multipart(request(done))
        return done / (time.perf_counter() - started)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.zmq_bare", description=__doc__)
    parser.add_argument("role", choices=("echo", "broker", "worker"))
    parser.add_argument("endpoints", nargs="+")
    args = parser.parse_args()
    servers: dict[str, Callable[..., None]] = {"echo": serve_echo, "broker": serve_broker, "worker": serve_worker}
    servers[args.role](*args.endpoints)
