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


def test_a_piece_is_padded_to_its_next_second_and_a_job_to_whisper_s_30_s() -> None:
    """The encoder hears a job padded to 30 s, as ``transcribe`` does, and a piece of a long recording padded only
    up to its next ``PIECE_PAD_S``; items share a pass only with items of the same padding."""
    from workers.engine import DecodeItem
    from workers.whisper_batch import PIECE_PAD_S, by_padding, encoder_frames

    hop, most = 160, 3000  # faster-whisper's feature extractor: 100 frames a second, 30 s at most
    assert PIECE_PAD_S == 1  # the figures below are worked out for 1 s

    def item(seconds: float, piece: bool) -> DecodeItem:
        return DecodeItem(np.zeros(round(seconds * 16000), dtype=np.float32), {}, piece=piece)

    assert encoder_frames(item(3.0, piece=False), hop, most) == most
    assert encoder_frames(item(21.3, piece=True), hop, most) == 2200  # 2131 frames of content
    assert encoder_frames(item(16.0, piece=True), hop, most) == 1700  # 1601
    assert encoder_frames(item(30.0, piece=True), hop, most) == most  # never past Whisper's window
    items = [item(21.3, True), item(3.0, False), item(21.2, True), item(16.0, True), item(9.0, False)]
    assert by_padding(items, hop, most) == [[0, 2], [1, 4], [3]]
