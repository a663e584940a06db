"""``python -m hub.client`` as a person uses it from a shell: piped into ``head``, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import ROOT, Hub, echo_provider

pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "hub.client"]


def test_status_into_a_pipe_nobody_reads_ends_quietly(hub_factory: Callable[..., Hub]) -> None:
    """``status | head``: the reader is gone before the table is written; no BrokenPipeError traceback."""
    hub = hub_factory({"echo": echo_provider()})
    read, write = os.pipe()
    os.close(read)  # the reader has gone already: every write fails with EPIPE
    try:
        ran = subprocess.run(
            [*CLI, "--endpoint", hub.endpoint, "status"],
            cwd=ROOT,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert ran.returncode == 141 and ran.stderr == "", ran.stderr


def test_ctrl_c_during_first_contact_says_interrupted() -> None:
    """A peer that accepts the TCP connection and never speaks ZMTP: the CLI waits for the hub's HELLO, a
    Ctrl-C there is reported as an interruption, not as HUB_UNREACHABLE nor as a traceback."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        mute.settimeout(30)
        cli = subprocess.Popen(
            [*CLI, "--endpoint", f"tcp://127.0.0.1:{mute.getsockname()[1]}", "status"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = mute.accept()  # the CLI is now in its first contact
            with conn:
                cli.send_signal(signal.SIGINT)
                out, err = cli.communicate(timeout=30)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    assert cli.returncode == 130 and err.strip() == "interrupted" and out == "", (cli.returncode, err)
