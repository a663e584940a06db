"""Fixtures that start real supervisors (``python -m hub.supervisor``) on free ports and stop them after."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml

from hub import shm
from hub.client import HubClient
from hub.errors import HubError
from hub.wer import word_error_rate  # noqa: F401  (the tests' WER is the hub's)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
CLIPS = ("hello", "coffee", "stella", "weather")


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until ``predicate()`` is true; a generous deadline, so a busy machine is slow, not wrong."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def extras_required() -> bool:
    """Under CI or ``make test`` (ASR_HUB_REQUIRE_EXTRAS=1) what a test needs must be there: a missing piece
    fails the run instead of skipping silently."""
    return bool(os.environ.get("CI") or os.environ.get("ASR_HUB_REQUIRE_EXTRAS"))


def required_tool(name: str, install: str) -> str:
    """The path of the program ``name``; without it the test skips (a developer's machine) or, where extras
    are required, fails, saying how to install it."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed ({install})"
        if extras_required():
            pytest.fail(f"{reason}; CI and `make test` (ASR_HUB_REQUIRE_EXTRAS=1) need it", pytrace=False)
        pytest.skip(reason)
    return path


def script_env() -> dict[str, str]:
    """The environment the project's shell scripts run in from a test: the Python running the tests first on
    PATH, as an activated virtualenv puts it (a worktree has no .venv of its own for them to find)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


# The files whose tests take longest (make test's --durations, 2 cores), heaviest first: pytest-xdist hands out
# files in collection order, so these start first and the short files fill the processes at the end, instead of
# one long file starting last and running alone.
HEAVY_FIRST = (
    "tests/models/test_sessions.py",
    "tests/models/test_live_vad.py",
    "tests/models/test_funasr.py",
    "tests/integration/test_resilience.py",
    "tests/integration/test_farm.py",
    "tests/models/test_whisper.py",
    "tests/models/test_live_batch.py",
    "tests/integration/test_gateway_many_hubs.py",
    "tests/integration/test_resume.py",
    "tests/models/test_gateway_openai.py",
    "tests/integration/test_gray_release.py",
    "tests/models/test_long_whisper.py",
    "tests/integration/test_long_audio.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heaviest files first (``HEAVY_FIRST``), the rest in the order given."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


@pytest.fixture(autouse=True)
def _ctrl_c_as_python_sets_it() -> Iterator[None]:
    """Every test starts with Python's own SIGINT handler in this process. A shell without job control starts
    a background command (``make test &``) with SIGINT ignored, a process keeps an ignored signal ignored
    across fork and exec, and Python then installs no KeyboardInterrupt handler: every CLI a test started
    shrugged off its Ctrl-C, and the two Ctrl-C tests failed."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


PORTS_BELOW_EPHEMERAL = range(20000, 32768)  # the kernel's ephemeral range starts at 32768 here (and by default)
PORT_BLOCKS = 8  # test processes that may run at once (pytest-xdist's gw0..gw7)


def _port_block() -> range:
    """This test process's own ports: a block of ``PORTS_BELOW_EPHEMERAL`` by its pytest-xdist worker number."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) % PORT_BLOCKS if worker[2:].isdigit() else 0
    size = len(PORTS_BELOW_EPHEMERAL) // PORT_BLOCKS
    start = PORTS_BELOW_EPHEMERAL.start + index * size
    return range(start, start + size)


_PORTS = _port_block()
_next_port = iter(random.sample(_PORTS, len(_PORTS)))


def free_port() -> int:
    """A port free now that no other test process will be given: ``bind(0)`` hands a port just released to the
    next caller, so two test processes could get the same one and one's hub answered the other's client (a CURVE
    hub refused a test's plain client). Each process takes its ports from a block of its own, below the
    ephemeral range (which the kernel's outgoing connections use), in a shuffled order."""
    for port in _next_port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"every port of {_PORTS} was handed out")


@dataclass
class Hub:
    """A running supervisor process and how to reach it."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    expected_exit: int = 0  # what the teardown expects: a test that kills the supervisor says how
    faults_expected: bool = False  # a test that injects a bug checks the log itself
    _status_client: HubClient | None = field(default=None, init=False, repr=False, compare=False)

    def client(self, **kwargs: Any) -> HubClient:
        return HubClient(self.endpoint, **{"timeout": 30.0, **kwargs})

    def status(self) -> dict[str, Any]:
        """The hub's status, through one client kept for it: tests poll this many times a second, and a new
        client each time (a context, a socket, a HELLO) cost 3 ms of CPU per poll against 0.7 ms."""
        if self._status_client is None:
            self._status_client = self.client()
        return self._status_client.status()

    def close_status_client(self) -> None:
        if self._status_client is not None:
            self._status_client.close()
            self._status_client = None

    def worker_pids(self) -> list[int]:
        return [w["pid"] for p in self.status()["providers"].values() for w in p["workers"]]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit and return its code. The log is read once the process has ended, so what
        it wrote while draining counts too: an internal error or a traceback of its own fails the test."""
        self.close_status_client()
        if self.proc.poll() is None:
            # until it logs "listening on" its signal handlers are not installed: a SIGTERM would kill it outright
            wait_for(
                lambda: self.proc.poll() is not None or "listening on" in self.log(), timeout, "the supervisor to start"
            )
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"supervisor did not stop within {timeout} s:\n{self.log()}") from None
        faults = [] if self.faults_expected else supervisor_faults(self.log())
        assert not faults, "the supervisor hit a bug:\n" + "\n".join(faults) + "\n--- log ---\n" + self.log()[-5000:]
        return int(self.proc.returncode)

    def finish(self) -> None:
        """Stop it and check it as every test's hub is checked: the exit it was expected to make, a log without
        a bug, and no process of its group left behind (those are killed, and fail the test)."""
        problems = []
        try:
            code = self.stop()
            if code != self.expected_exit:
                problems.append(f"the supervisor exited with {code}:\n{self.log()[-5000:]}")
        except AssertionError as exc:
            problems.append(str(exc))
        left = live_in_group(self.proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        if left:
            problems.append(f"processes left behind by the supervisor: {left}")
        assert not problems, "\n\n".join(problems)


# a text log line: "2026-01-01 12:00:00,123 LEVEL logger[ worker-id]: message"
_TEXT_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>[\w.]+)[ \w.-]*: ")


def _is_worker_error(logger: str, level: str) -> bool:
    """A worker reports a failed job with its traceback (``log.exception``): that is the model failing, not the hub."""
    return (logger == "workers" or logger.startswith("workers.")) and level == "ERROR"


def supervisor_faults(log: str) -> list[str]:
    """Lines of a supervisor's log (text or JSON lines) that show a bug in the hub: an internal error, or a
    traceback that is not part of a worker's report of a failed job (a crash printed raw, in drain included)."""
    faults: list[str] = []
    owner: tuple[str, str] | None = None  # (logger, level) of the record that raw lines continue
    for number, line in enumerate(log.splitlines(), 1):
        if "internal error" in line:
            faults.append(f"line {number}: {line}")
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                owner = None  # a JSON record is one line; raw lines after it are nobody's
                logger, level = str(entry.get("logger", "")), str(entry.get("level", ""))
                if "exc" in entry and not _is_worker_error(logger, level):
                    faults.append(f"line {number}: a traceback logged by {logger}: {line[:300]}")
                continue
        if match := _TEXT_RECORD.match(line):
            owner = (match["logger"], match["level"])
        elif line.startswith("Traceback (most recent call last)") and not (owner and _is_worker_error(*owner)):
            faults.append(f"line {number}: a traceback outside any worker's error report")
    return faults


def start_hub(
    tmp_path: Path,
    providers: dict[str, Any],
    hub: dict[str, Any] | None = None,
    ready: bool = True,
    gateway: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    routes: dict[str, Any] | None = None,
    ready_timeout: float = 60.0,
) -> Hub:
    """Start ``python -m hub.supervisor`` on a fresh config; ``args`` are extra command-line flags (a
    ``--frontend`` among them is where the hub is reached), ``env`` extra environment variables,
    ``routes`` the config's ``routes:`` section; ``ready_timeout`` how long it may take to get ready."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = {
        "hub": {"frontend": endpoint, "runtime_dir": str(tmp_path / "run"), **(hub or {})},
        "providers": providers,
        **({"gateway": gateway} if gateway is not None else {}),
        **({"routes": routes} if routes is not None else {}),
    }
    config_path = tmp_path / f"hub-{endpoint.rsplit(':', 1)[1]}.yaml"
    config_path.write_text(
        yaml.safe_dump(config, sort_keys=False)
    )  # in the test's order: its first provider is the default
    log_path = config_path.with_suffix(".log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.supervisor", "--config", str(config_path), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a test can kill it whole
        )
    if "--frontend" in args:
        endpoint = args[args.index("--frontend") + 1]
    started = Hub(endpoint, proc, config_path, log_path)
    if ready:
        try:
            with started.client() as c:
                c.wait_ready(timeout=ready_timeout)
        except BaseException:
            started.stop()
            raise
    return started


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """Start supervisors for one test; every one is stopped and checked for leftovers afterwards."""
    hubs: list[Hub] = []

    def factory(providers: dict[str, Any], hub: dict[str, Any] | None = None, ready: bool = True, **kwargs: Any) -> Hub:
        started = start_hub(tmp_path, providers, hub, ready, **kwargs)
        hubs.append(started)
        return started

    yield factory
    failures: list[str] = []
    for started in hubs:  # every one is stopped, whatever the one before it showed
        try:
            started.finish()
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)


def live_in_group(pgid: int) -> list[int]:
    """The processes of group ``pgid`` still running (a zombie has ended; its reaping is up to init)."""
    found = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    live = []
    for pid in map(int, found):
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.append(pid)
        except psutil.NoSuchProcess:
            pass
    return live


def _ours(name: str) -> bool:
    """A segment this test session answers for: made by this process, a descendant, or a process now gone
    (other programs running beside the suite, another test run among them, keep theirs)."""
    pid = shm.owner_pid(name)
    if pid is None:
        return False
    try:
        owner = psutil.Process(pid)
        return pid == os.getpid() or os.getpid() in {p.pid for p in owner.parents()}
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session", autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """After the whole suite, /dev/shm holds no segment of ours."""
    before = set(shm.list_segments())
    yield
    deadline = time.monotonic() + 5
    while (left := {n for n in set(shm.list_segments()) - before if _ours(n)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


@contextmanager
def steady_load(hub: Hub, clients: int = 3, vary: bool = False, timeout: float = 30.0) -> Iterator[Counter[str]]:
    """Echo requests from ``clients`` threads, each with its own client, until the block ends; yields every
    outcome, counted (``load_threads``): "ok" for the right text, the code of a ``HubError``, "wrong text: ..."
    or the type and message of any other exception. With ``vary``, each request takes a random part of the
    tone and a random sleep (seeded per thread)."""
    from workers.echo import echo_text

    tone = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)

    @contextmanager
    def session(seed: int) -> Iterator[Callable[[], str]]:
        rng = random.Random(seed)

        def one() -> str:
            audio, sleep = (tone[: rng.randint(1600, 16000)], rng.uniform(0, 0.1)) if vary else (tone, 0.05)
            try:
                text = client.transcribe(audio, sleep=sleep, timeout=timeout).text
            except HubError as exc:
                return exc.code
            return "ok" if text == echo_text(audio) else f"wrong text: {text!r}"

        with hub.client() as client:
            yield one

    with load_threads(session, clients, timeout + 10) as outcomes:
        yield outcomes


@contextmanager
def repeating(one: Callable[[], str], threads: int, join_timeout: float = 40.0) -> Iterator[Counter[str]]:
    """Call ``one`` over and over from ``threads`` threads until the block ends; yields what it returned, counted
    (``load_threads``)."""
    with load_threads(lambda index: nullcontext(one), threads, join_timeout) as outcomes:
        yield outcomes


@contextmanager
def load_threads(
    session: Callable[[int], AbstractContextManager[Callable[[], str]]], threads: int, join_timeout: float
) -> Iterator[Counter[str]]:
    """Thread ``i`` enters ``session(i)`` and calls what it yields over and over until the block ends; every
    outcome is counted (under a lock). An exception ends its thread and is counted as "Type: message", so a
    thread that died says so in the outcomes a test compares. On leaving the block every thread must have
    finished: one still running is a hung request, and fails the test."""
    stop = threading.Event()
    lock = threading.Lock()
    outcomes: Counter[str] = Counter()

    def count(outcome: str) -> None:
        with lock:
            outcomes[outcome] += 1

    def run(index: int) -> None:
        try:
            with session(index) as one:
                while not stop.is_set():
                    count(one())
        except Exception as exc:
            count(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=run, args=(i,), name=f"load-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield outcomes
    finally:
        stop.set()
        deadline = time.monotonic() + join_timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
    hung = [worker.name for worker in workers if worker.is_alive()]
    assert not hung, f"requests still hanging after the load stopped: {hung} ({outcomes})"


def echo_provider(**pool: Any) -> dict[str, Any]:
    return {"type": "echo", "pool": {"min_size": 1, "max_size": 2, **pool}}


def reference(name: str) -> str:
    return (DATA / f"{name}.txt").read_text().strip()


# the gateway's fixtures, for the gateway tests of every tier (tests/gateway_support.py); imported last, as it
# imports this module's helpers
from tests.gateway_support import gateway_factory, whisper_gateway  # noqa: E402,F401
