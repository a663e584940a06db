"""Batched decoding inside a worker, without a model or a process: when a batch starts, how it splits by
options, how a failure stays with its own job, and the echo adapter's one pass with per-job faults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hub.protocol import WorkerSpec
from workers.batch import batch_ready, decode_groups, groups
from workers.echo import EchoEngine, echo_text
from workers.engine import DecodeItem, EngineResult, Outcome


def _spec(kind: str) -> WorkerSpec:
    return WorkerSpec(
        id=f"{kind}-1",
        provider=kind,
        type=kind,
        model="",
        device="cpu",
        compute_type="auto",
        cpu_threads=1,
        backend="",
        shm_prefix="",
        heartbeat_interval=1.0,
        options={},
    )


def _item(pcm: np.ndarray, **options: Any) -> DecodeItem:
    return DecodeItem(pcm, options)


# --- when a batch starts, how it splits ----------------------------------------------


def test_a_batch_starts_when_full_or_once_its_oldest_job_waited_long_enough() -> None:
    assert batch_ready(held=1, oldest=10.0, now=10.0, max_batch=1, wait_s=0.005)  # no batching: at once
    assert not batch_ready(held=2, oldest=10.0, now=10.004, max_batch=4, wait_s=0.005)
    assert batch_ready(held=2, oldest=10.0, now=10.005, max_batch=4, wait_s=0.005)
    assert batch_ready(held=4, oldest=10.0, now=10.0, max_batch=4, wait_s=0.005)


def test_items_group_by_their_option_set_in_arrival_order() -> None:
    pcm = np.zeros(160, dtype=np.float32)
    items = [
        _item(pcm, language="en"),
        _item(pcm, language="de"),
        _item(pcm, language="en", beam_size=1),
        _item(pcm, language="en"),
        _item(pcm, language="de"),
    ]
    assert groups(items) == [[0, 3], [1, 4], [2]]


def _result(text: str) -> EngineResult:
    return EngineResult(text=text, segments=(), language=None, duration=0.0)


def test_a_group_whose_batched_call_raises_is_decoded_again_one_by_one_so_only_the_bad_item_fails() -> None:
    pcm = np.zeros(160, dtype=np.float32)
    items = [_item(pcm, n=1), _item(pcm, n=2), _item(pcm.copy(), n=1)]
    items[2] = DecodeItem(np.full(3, np.nan, dtype=np.float32), {"n": 1})
    batched_calls: list[int] = []

    def decode_group(group: Sequence[DecodeItem]) -> list[Outcome]:
        batched_calls.append(len(group))
        if any(np.isnan(item.pcm).any() for item in group):
            raise ValueError("nan in the batch")
        return [_result(f"n={item.options['n']}") for item in group]

    def transcribe(pcm: np.ndarray, options: dict[str, Any], on_segment: Any) -> EngineResult:
        if np.isnan(pcm).any():
            raise ValueError("nan audio")
        return _result(f"alone n={options['n']}")

    outcomes = decode_groups(items, decode_group, transcribe)
    assert batched_calls == [2, 1]  # the n=1 group together, then the n=2 group
    assert isinstance(outcomes[0], EngineResult) and outcomes[0].text == "alone n=1"
    assert isinstance(outcomes[1], EngineResult) and outcomes[1].text == "n=2"
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "nan audio"


# --- echo: one pass, each job's faults its own ----------------------------------------


def test_echo_decodes_a_batch_in_one_pass_and_one_jobs_fault_fails_it_alone() -> None:
    engine = EchoEngine(_spec("echo"))
    engine.transcribe(np.zeros(1600, dtype=np.float32), {}, lambda s: None)  # the start's health decode
    a, b = np.ones(8000, dtype=np.float32) * 0.1, np.ones(16000, dtype=np.float32) * 0.2
    outcomes = engine.transcribe_batch([_item(a), _item(b, fail="this one"), _item(b, language="de")])
    assert [o.text if isinstance(o, EngineResult) else f"error: {o}" for o in outcomes] == [
        echo_text(a),
        "error: this one",
        echo_text(b),
    ]
    assert engine.decodes == 4  # every job counts as a decode, for fail_from and fail_every
