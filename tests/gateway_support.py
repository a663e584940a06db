"""Fixtures for the gateway: a real supervisor that runs a real gateway process (its `gateway:` section)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Hub, free_port, start_hub

WHISPER = {"type": "whisper", "model": "tiny.en", "pool": {"min_size": 1, "max_size": 2}}


@dataclass
class Gateway:
    """A supervisor with its gateway child, and where the gateway listens."""

    hub: Hub
    port: int
    wyoming_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        return http_get(self.url + path, timeout)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """A GET's status and body, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ready(url: str, timeout: float = 60.0) -> None:
    """Until the gateway's /readyz answers 200 (the gateway is up and sees a ready hub)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode()
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise AssertionError(f"gateway at {url} not ready within {timeout} s: {last}")


def gateway_keys(tmp: Path) -> tuple[dict[str, Any], str, str]:
    """CURVE keys for a hub and its gateway: the hub config's ``curve`` section (the gateway's public key
    allowed), the gateway's secret key file and the hub's public key file."""
    from hub.keys import main as make_keys

    keys, allowed = tmp / "keys", tmp / "allowed"
    allowed.mkdir()
    for name in ("server", "gateway"):
        assert make_keys([str(keys), name]) == 0
    (allowed / "gateway.key").write_bytes((keys / "gateway.key").read_bytes())
    curve = {"curve": {"server_secret_key": str(keys / "server.key_secret"), "allowed_clients": str(allowed)}}
    return curve, str(keys / "gateway.key_secret"), str(keys / "server.key")


@pytest.fixture
def gateway_factory(hub_factory: Callable[..., Hub]) -> Callable[..., Gateway]:
    """Start a supervisor whose config enables the gateway (HTTP and Wyoming on free ports); wait until it serves."""

    def factory(
        providers: dict[str, Any] | None = None,
        hub: dict[str, Any] | None = None,
        routes: dict[str, Any] | None = None,
        **gateway: Any,
    ) -> Gateway:
        section = {"enabled": True, "port": free_port(), "wyoming_port": free_port(), **gateway}
        # the gateway's /readyz waits for the hub's readiness too (and works where only the gateway has CURVE keys)
        started = hub_factory(providers or {"whisper": WHISPER}, hub, ready=False, gateway=section, routes=routes)
        result = Gateway(started, section["port"], section["wyoming_port"])
        wait_ready(result.url)
        return result

    return factory


@contextmanager
def serving(tmp: Path, providers: dict[str, Any], **section: Any) -> Iterator[Gateway]:
    """A supervisor with its gateway for a whole module; afterwards it must have stopped cleanly, without a
    traceback in its log (the gateway's lines are in it too)."""
    section = {"enabled": True, "port": free_port(), "wyoming_port": free_port(), **section}
    started = start_hub(tmp, providers, ready=False, gateway=section)
    try:
        gw = Gateway(started, section["port"], section["wyoming_port"])
        wait_ready(gw.url)
        yield gw
    finally:
        started.finish()
        assert "Traceback" not in started.log(), started.log()[-5000:]


@pytest.fixture(scope="session")
def whisper_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One supervisor with the bundled tiny.en (the default provider), an echo provider named "echo" and its gateway,
    shared by the tests that change nothing, in every module that one test process runs (the gateway's OpenAI,
    Wyoming and live modules, and the browser's): a process that runs two of them starts it once."""
    providers = {
        "whisper": WHISPER,
        "echo": {"type": "echo", "pool": {"min_size": 1, "max_size": 2, "max_sessions": 1}},
    }
    with serving(tmp_path_factory.mktemp("gateway"), providers) as gw:
        yield gw
