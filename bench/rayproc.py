"""Ray Serve for the benchmark as a process tree of its own, always removed at the end.

``RaySide`` starts ``python -m bench.ray_serve`` (this interpreter: ``.venv-peers``) in a new session, with
the hub workers' thread settings in its environment. Every process Ray starts (GCS, raylet, dashboard and
its heads, agents, Serve's controller and proxy, the replicas: 22 here) stays in that session, although
the replicas get process groups of their own. So ``stop`` closes the command pipe (the Ray driver then shuts
Serve and Ray down), and then terminates, and after a grace period kills, every process still in the
session; it raises if any survives. It runs on every exit of the ``with`` block: an error, Ctrl-C, or the
SIGTERM that ``bench.peers`` turns into an exception. Only a SIGKILL of the benchmark itself skips it, and
then the Ray driver sees its stdin close and shuts Ray down on its own.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from bench.settings import ROOT, process_env

REPLICAS = 2  # as the hub's pool of two workers: one CPU each, one request at a time
COMMAND_TIMEOUT_S = 600.0
SHUTDOWN_S = 60.0
GRACE_S = 10.0


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes (zombies left out) whose session is ``sid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):  # gone meanwhile
            pass
    return found


def end_session(sid: int) -> list[psutil.Process]:
    """SIGTERM every process of session ``sid``, SIGKILL those alive after ``GRACE_S``; returns any survivor."""
    procs = session_processes(sid)
    for sig, wait_s in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=wait_s)
        if not procs:
            break
    return session_processes(sid)


class RaySide:
    """The Ray driver process (``bench.ray_serve``) and everything Ray started under it."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "ray.log"
        self._argv = [sys.executable, "-m", "bench.ray_serve", str(port), str(workdir / "ray")]
        self._proc: subprocess.Popen[str] | None = None
        self.started_at = 0.0  # time.perf_counter() just before the process started

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> RaySide:
        env = process_env(1, None)  # the 1-thread worker's environment; replicas inherit it
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # replicas import bench
        self.started_at = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def ask(self, op: str, timeout_s: float = COMMAND_TIMEOUT_S, **args: Any) -> Any:
        """Send one command, wait for its one-line answer."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else ""
        if not line:
            state = "exited" if proc.poll() is not None else f"gave no answer in {timeout_s:.0f} s"
            raise RuntimeError(f"Ray Serve {state} on {op!r}:\n{self.log_tail()}")
        return json.loads(line)

    def server_pids(self) -> list[int]:
        """Every process Ray started (the driver, which plays the client, left out)."""
        return [p.pid for p in session_processes(self.pid) if p.pid != self.pid]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()  # the driver's loop ends: it shuts Serve and Ray down
            except BrokenPipeError:
                pass
        try:
            proc.wait(SHUTDOWN_S)
        except subprocess.TimeoutExpired:
            pass
        survivors = end_session(proc.pid)
        proc.wait(5)
        if survivors:
            listed = ", ".join(f"{p.pid} {p.name()}" for p in survivors)
            raise RuntimeError(f"Ray processes survived SIGKILL: {listed}")
