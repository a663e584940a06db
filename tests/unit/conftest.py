"""The unit tier's rule, enforced: a test here starts no process and opens no socket (those belong in
tests/integration), so the tier answers in seconds on any machine. An asyncio event loop's own self-pipe (a
``socketpair`` inside the process) is allowed: binding, listening or connecting is not."""

from __future__ import annotations

import socket
import subprocess
from typing import Any, NoReturn

import pytest
import zmq


@pytest.fixture(autouse=True)
def no_process_no_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(what: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> NoReturn:
            raise AssertionError(f"a unit test may not {what}: move it to tests/integration")

        return refused

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a process"))
    for method in ("bind", "connect", "connect_ex", "listen"):
        monkeypatch.setattr(socket.socket, method, refuse("open a socket"))
    monkeypatch.setattr(zmq.Context, "socket", refuse("open a ZeroMQ socket"))
