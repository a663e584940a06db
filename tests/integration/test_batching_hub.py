"""Batched decoding through a real hub (supervisor, echo workers, shared memory, the SDK): batches form under
load and show in status and on the Prometheus page, one job's failure stays its own, a worker killed
mid-batch has every job of its batch retried, and a client's cancel of a held job frees its place."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import numpy as np
import pytest

from hub.errors import HubError, JobTimeout
from tests.conftest import echo_provider, wait_for
from workers.echo import echo_text, echo_words

pytestmark = pytest.mark.timeout(120)


def _pcm(level: float) -> np.ndarray:
    return np.full(8000, level, dtype=np.float32)


def _concurrently(hub: Any, calls: list[dict[str, Any]]) -> list[Any]:
    """Each call's outcome (its transcript, or the error it raised), every call on its own client thread."""
    outcomes: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        with hub.client() as client:
            try:
                outcomes[i] = client.transcribe(**calls[i])
            except HubError as exc:
                outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


def test_batches_form_under_load_and_status_and_metrics_show_them(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_batch=4, batch_wait_ms=0)})
    with hub.client() as client:
        blocker = threading.Thread(target=client.transcribe, args=(_pcm(0.05),), kwargs={"sleep": 1.0})
        blocker.start()
        wait_for(lambda: hub.status()["providers"]["echo"]["workers"][0]["jobs_held"] == 1, what="the first job held")
        levels = [0.1, 0.2, 0.3]
        outcomes = []
        threads = [
            threading.Thread(target=lambda lv=lv: outcomes.append((lv, client.transcribe(_pcm(lv)).text)))
            for lv in levels
        ]
        for thread in threads:
            thread.start()
        wait_for(
            lambda: hub.status()["providers"]["echo"]["workers"][0]["jobs_held"] == 4,
            what="four jobs held by one worker",
        )
        for thread in [blocker, *threads]:
            thread.join(30)
        status = hub.status()["providers"]["echo"]
    assert sorted(outcomes) == [(lv, echo_text(_pcm(lv))) for lv in levels]  # each its own text
    assert status["mean_batch"] == pytest.approx(2.0)  # a batch of 1 (the blocker), then the three held behind it
    assert status["workers"][0]["jobs_held"] == 0 and status["workers"][0]["state"] == "idle"


def test_one_jobs_failure_fails_it_alone_in_its_batch(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_batch=3, batch_wait_ms=300)})
    outcomes = _concurrently(hub, [{"audio": _pcm(0.1)}, {"audio": _pcm(0.2), "fail": "only me"}, {"audio": _pcm(0.3)}])
    assert outcomes[0].text == echo_text(_pcm(0.1)) and outcomes[2].text == echo_text(_pcm(0.3))
    assert (
        isinstance(outcomes[1], HubError) and outcomes[1].code == "INFERENCE_FAILED" and "only me" in str(outcomes[1])
    )
    assert hub.status()["providers"]["echo"]["mean_batch"] == pytest.approx(3.0)


def test_a_worker_killed_mid_batch_has_every_job_of_its_batch_retried(hub_factory) -> None:
    hub = hub_factory({"echo": echo_provider(min_size=1, max_size=1, max_batch=3, batch_wait_ms=300, retry_on_crash=1)})
    calls = [{"audio": _pcm(0.1 * (i + 1)), "sleep": 2.0, "timeout": 60} for i in range(3)]
    result: list[Any] = []
    runner = threading.Thread(target=lambda: result.extend(_concurrently(hub, calls)))
    runner.start()
    wait_for(lambda: hub.status()["providers"]["echo"]["workers"][0]["jobs_held"] == 3, what="a batch of three")
    time.sleep(0.5)  # past batch_wait_ms: the batch is decoding
    os.kill(hub.status()["providers"]["echo"]["workers"][0]["pid"], signal.SIGKILL)
    runner.join(60)
    assert [r.text if not isinstance(r, HubError) else r for r in result] == [echo_text(c["audio"]) for c in calls]
    echo = hub.status()["providers"]["echo"]
    assert echo["errors"] == {} and echo["workers"][0]["restarts"] == 1  # all three retried on the replacement


def test_a_cancelled_held_job_leaves_its_workers_batch(hub_factory) -> None:
    """The worker reads the CANCEL once its running batch ends, before it starts the next: the job given up on
    is never decoded (the DEBUG line per batch names every job a batch decodes)."""
    hub = hub_factory(
        {"echo": echo_provider(min_size=1, max_size=1, max_batch=2, batch_wait_ms=0)}, {"log_level": "DEBUG"}
    )
    with hub.client() as client:
        blocker = threading.Thread(target=client.transcribe, args=(_pcm(0.05),), kwargs={"sleep": 1.5})
        blocker.start()
        # the worker says when a batch starts (held by the worker is not yet decoding: read together, the two
        # jobs would make one batch)
        wait_for(lambda: "decoding a batch of 1 job(s)" in hub.log(), what="the first job's batch to start")
        started = time.monotonic()
        with pytest.raises(JobTimeout):
            client.transcribe(_pcm(0.1), timeout=0.5)  # held behind the blocker's batch, then given up
        assert time.monotonic() - started < 1.4
        blocker.join(30)
        assert client.transcribe(_pcm(0.2)).text == echo_text(_pcm(0.2))
        echo = hub.status()["providers"]["echo"]
    batches = [line for line in hub.log().splitlines() if "decoding a batch of" in line]
    assert len(batches) == 2 and all("a batch of 1 job(s)" in line for line in batches), batches
    cancelled = [line for line in hub.log().splitlines() if "cancelled by its client" in line]
    assert len(cancelled) == 1 and cancelled[0].split()[cancelled[0].split().index("job") + 1] not in " ".join(batches)
    assert echo["errors"] == {"JOB_TIMEOUT": 1} and echo["workers"][0]["jobs_held"] == 0


@pytest.mark.parametrize("max_batch, mean", [(1, 1.0), (3, 2.0)])
def test_live_sessions_of_one_worker_step_together_in_one_pass(hub_factory, max_batch: int, mean: float) -> None:
    """Three live sessions on a worker that holds three, their audio sent while the worker decodes a one-shot
    job: once it is done, with max_batch 3 all three step in one pass (the status' mean batch: the job's pass
    of one, then the sessions' pass of three), with max_batch 1 every pass is one; either way each session's
    text is its own audio's."""
    hub = hub_factory(
        {"echo": echo_provider(min_size=1, max_size=1, sessions_per_worker=3, max_batch=max_batch, batch_wait_ms=0)}
    )
    # each half second at its own level: echo's words differ from one to the next (and from session to session)
    audios = [np.repeat(np.float32(0.1 * k) + 0.01 * np.arange(1, 7, dtype=np.float32), 8000) for k in (1, 2, 3)]
    with hub.client() as client:
        sessions = [client.open_stream() for _ in audios]
        job = threading.Thread(target=client.transcribe, args=(_pcm(0.05),), kwargs={"sleep": 2.0})
        job.start()
        wait_for(lambda: hub.status()["providers"]["echo"]["workers"][0]["state"] == "busy", what="the job decoding")
        for session, pcm in zip(sessions, audios, strict=True):
            session.send(pcm)
        job.join(30)
        # each session's first step (its partial) before its close, which would decode everything instead
        assert [next(session.results()).kind for session in sessions] == ["partial"] * 3
        texts = [session.close().text for session in sessions]
        status = hub.status()["providers"]["echo"]
    assert texts == [" ".join(w.word.strip() for w in echo_words(pcm)) for pcm in audios]
    assert status["mean_batch"] == pytest.approx(mean), hub.log()
