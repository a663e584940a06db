"""Issue 27's two live-session scenarios, with VAD off and on, through a real supervisor and the SDK.

- **duty cycle**: 8 sessions on 2 tiny.en workers of 1 thread, at real time; each session plays two
  utterances (two of the committed clips, a different pair per session), each followed by 6 s of silence.
  Target: finals p95 ≤ 3 s after each utterance ends; WER ≤ one session alone + 0.02.
- **continuous speech**: 4 sessions on the same 2 workers, each the committed clips joined into 46 s with
  0.5 s pauses (the issue-14 scenario). Target: finals p95 ≤ 3 s.

A final's latency is its arrival minus the moment its last word was spoken on the playback clock (its
``end`` in the stream), as ``bench.streaming`` measures it; with VAD the time from each utterance's end
(``speech_stopped``'s ``at``) to its ``utterance`` marker is measured too. WER is against what the clips
say (their ``.txt``). Decodes per session-minute come from each session's answer (``extra.decodes``).
Starts are staggered over one step, as real microphones are not in step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.clips import DATA, SOURCES, build_clips, read_wav
from bench.hubproc import running_hub, whisper_provider
from hub.client import HubClient
from hub.wer import word_error_rate

CHUNK = 1600  # 100 ms
RATE = 16000
GAP_S = 6.0


@dataclass
class Played:
    """One session's outcome: latencies of its finals and of its utterances' ends, its text, its decodes."""

    finals: list[float] = field(default_factory=list)
    utterances: list[float] = field(default_factory=list)
    text: str = ""
    decodes: int = 0
    seconds: float = 0.0


# a session may end this long after its audio (its last decodes, its close) before it counts as hung
SESSION_GRACE_S = 120.0


def play(client: HubClient, pcm: np.ndarray, start_at: float, provider: str) -> Played:
    """Stream ``pcm`` at real time from ``start_at`` (monotonic clock) in 100 ms chunks."""
    out = Played(seconds=pcm.size / RATE)
    with client.open_stream(provider) as session:
        time.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()

        def read() -> None:
            for event in session.results():
                now = time.monotonic() - started
                if event.kind == "final" and event.segment is not None:
                    out.finals.append(now - event.segment.end)
                elif event.kind == "utterance":
                    out.utterances.append(now - event.at)

        reader = threading.Thread(target=read)
        reader.start()
        for offset in range(0, pcm.size, CHUNK):
            time.sleep(max(0.0, started + offset / RATE - time.monotonic()))
            session.send(pcm[offset : offset + CHUNK])
        transcript = session.close()
        reader.join()
    out.text = transcript.text
    out.decodes = int(transcript.extra.get("decodes", 0))
    return out


def duty_cycle_audio(index: int) -> tuple[np.ndarray, str]:
    """Session ``index``'s audio (two clips, each followed by ``GAP_S`` of silence) and what it says."""
    names = [SOURCES[index % len(SOURCES)], SOURCES[(index + 1) % len(SOURCES)]]
    gap = np.zeros(int(GAP_S * RATE), dtype=np.float32)
    pcm = np.concatenate([part for name in names for part in (read_wav(DATA / f"{name}.wav"), gap)])
    return pcm, " ".join((DATA / f"{name}.txt").read_text().strip() for name in names)


def continuous_audio() -> tuple[np.ndarray, str]:
    """The 46 s of committed clips with 0.5 s pauses, as ``bench.streaming`` plays them, and what they say."""
    from bench.clips import _orders

    gap = np.zeros(8000, dtype=np.float32)
    pcm = np.concatenate([part for clip in build_clips() for part in (clip, gap)])
    said = " ".join((DATA / f"{name}.txt").read_text().strip() for names in _orders() for name in names)
    return pcm, said


def _percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None


def _run(client: HubClient, provider: str, audio: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    """Every session of ``audio`` at once (starts staggered over one second): the row of figures."""
    results: list[Played] = [Played()] * len(audio)
    errors: list[BaseException] = []
    begin = time.monotonic() + 0.5

    def one(i: int) -> None:
        try:
            results[i] = play(client, audio[i][0], begin + i / len(audio), provider)
        except Exception as exc:  # counted: a session that failed must fail the run, not read as silence
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(audio))]
    for thread in threads:
        thread.start()
    deadline = begin + max(pcm.size for pcm, _ in audio) / RATE + SESSION_GRACE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sum(thread.is_alive() for thread in threads)
    if errors or alive:
        raise RuntimeError(
            f"{len(errors)} of {len(audio)} sessions failed ({'; '.join(map(repr, errors[:3]))}) and {alive} did "
            f"not end within {SESSION_GRACE_S:.0f} s of their audio"
        )
    finals = [x for r in results for x in r.finals]
    utterances = [x for r in results for x in r.utterances]
    wers = [word_error_rate(said, r.text) for r, (_, said) in zip(results, audio, strict=False)]
    minutes = sum(r.seconds for r in results) / 60
    return {
        "sessions": len(audio),
        "final_latency_s": {
            "p50": _percentile(finals, 0.5),
            "p95": _percentile(finals, 0.95),
            "max": _percentile(finals, 1.0),
        },
        "utterance_latency_s": {
            "p50": _percentile(utterances, 0.5),
            "p95": _percentile(utterances, 0.95),
            "max": _percentile(utterances, 1.0),
        },
        "wer": {"mean": round(float(np.mean(wers)), 4), "max": round(max(wers), 4)},
        "decodes_per_session_minute": round(sum(r.decodes for r in results) / minutes, 1),
        "texts": [r.text for r in results],
    }


def measure(
    workdir: Path, scenario: str, device: str = "cpu", vads: tuple[bool, ...] = (False, True), max_batch: int = 1
) -> dict[str, Any]:
    """``scenario`` ``duty`` or ``continuous``, with each VAD setting in ``vads``: a hub of 2 one-thread workers
    each (``sessions_per_worker`` 4, so placement alone decides the spread; ``max_batch`` over 1 lets a worker's
    due sessions step in one pass); for ``duty`` also one session alone."""
    count = 8 if scenario == "duty" else 4
    audio = [duty_cycle_audio(i) for i in range(count)] if scenario == "duty" else [continuous_audio()] * count
    rows = []
    for vad in vads:
        provider = whisper_provider(2, 1, device)
        provider["pool"]["sessions_per_worker"] = 4
        provider["pool"]["max_batch"] = max_batch
        provider["stream"] = {"vad": vad}
        with (
            running_hub(workdir, f"turns-{scenario}-{'vad' if vad else 'plain'}", {"whisper": provider}) as hub,
            HubClient(hub.endpoint, timeout=300) as client,
        ):
            row = {"vad": vad, **_run(client, "whisper", audio)}
            if scenario == "duty":
                alone = [_run(client, "whisper", [audio[i]]) for i in range(2)]
                row["alone_wer"] = round(float(np.mean([a["wer"]["mean"] for a in alone])), 4)
            rows.append(row)
    return {"scenario": scenario, "device": device, "max_batch": max_batch, "rows": rows}


def _judged(scenario: str, row: dict[str, Any]) -> tuple[float | None, str]:
    """The p95 a row is judged by, and what it measures. The duty cycle's target is the final "after each
    utterance ends": with VAD, the utterance's end to its final (the marker that carries it); without VAD there
    is no utterance end, so each final's delay after its last word is judged, as it is for continuous speech."""
    if scenario == "duty" and row["vad"] and row["utterance_latency_s"]["p95"] is not None:
        return row["utterance_latency_s"]["p95"], "utterance end → final"
    return row["final_latency_s"]["p95"], "final after its last word"


def targets(figures: dict[str, Any]) -> list[str]:
    """Each row against the issue's target: met or missed, with the figures that decide it."""
    lines = []
    for row in figures["rows"]:
        p95, measure = _judged(figures["scenario"], row)
        latency = p95 is not None and p95 <= 3.0
        verdict = latency
        what = f"{measure} p95 {p95} s (≤ 3 s: {'met' if latency else 'missed'})"
        if "alone_wer" in row:
            wer_ok = row["wer"]["mean"] <= row["alone_wer"] + 0.02
            verdict = verdict and wer_ok
            what += f"; WER {row['wer']['mean']:.1%} vs alone {row['alone_wer']:.1%} (+0.02: {'met' if wer_ok else 'missed'})"
        lines.append(
            f"  {figures['scenario']}, VAD {'on' if row['vad'] else 'off'}: {'MET' if verdict else 'MISSED'}: {what}"
        )
    return lines


def bench_targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 27's targets for ``make bench``: each row of ``measure`` as report targets (p95 ≤ 3 s, and for
    the duty cycle the WER against one session alone)."""
    from bench.report import _target

    out = []
    for row in figures["rows"]:
        vad = "VAD on" if row["vad"] else "VAD off"
        p95, what = _judged(figures["scenario"], row)
        name = f"live {figures['scenario']}, {row['sessions']} sessions on 2 workers, {vad}: {what} p95"
        out.append(_target(name, p95 if p95 is not None else float("inf"), 3.0, False, "s"))
        if "alone_wer" in row:
            out.append(
                _target(
                    f"live {figures['scenario']}, {vad}: WER over one session alone",
                    row["wer"]["mean"] - row["alone_wer"],
                    0.02,
                    False,
                    "",
                    f"{row['wer']['mean']:.3f} vs {row['alone_wer']:.3f}",
                )
            )
    return out


def summary(figures: dict[str, Any]) -> str:
    lines = [
        f"\n{figures['scenario']} scenario ({figures['rows'][0]['sessions']} sessions on 2 workers x 1 thread, "
        f"max_batch {figures.get('max_batch', 1)}):",
        "  VAD  final p50/p95/max s      utterance end→marker p50/p95 s  WER mean/max    decodes/session-min",
    ]
    for r in figures["rows"]:
        f, u = r["final_latency_s"], r["utterance_latency_s"]
        lines.append(
            f"  {'on ' if r['vad'] else 'off'}  {f['p50']!s:>5} / {f['p95']!s:>5} / {f['max']!s:>5}    "
            f"{u['p50']!s:>5} / {u['p95']!s:>5}                  {r['wer']['mean']:>5.1%} / {r['wer']['max']:>5.1%}"
            f"   {r['decodes_per_session_minute']:>6}"
        )
    return "\n".join([*lines, *targets(figures)])


def decode_budget(device: str = "cpu") -> dict[str, Any]:
    """Decodes per session-minute as an unloaded worker makes them, VAD off and on: the adapter's streamer
    in this process, fed the scenario's audio in 100 ms chunks and stepped whenever due (no clock, so the
    machine's load cannot change the count). The duty-cycle audio of the four clip pairs, and the 46 s clips."""
    from bench.batching import one_thread

    one_thread()
    from hub.protocol import WorkerSpec
    from workers.engine import StreamSettings
    from workers.whisper import WhisperEngine

    spec = WorkerSpec(
        id="bench-1",
        provider="whisper",
        type="whisper",
        model="tiny.en",
        device=device,
        compute_type="auto",
        cpu_threads=1,
        backend="ipc:///nowhere",
        shm_prefix="asrhub_bench_",
        heartbeat_interval=1.0,
        options={},
        allow_download=False,
    )
    engine = WhisperEngine(spec)
    scenarios = {"duty": [duty_cycle_audio(i) for i in range(len(SOURCES))], "continuous": [continuous_audio()]}
    rows = []
    for name, audio in scenarios.items():
        for vad in (False, True):
            decodes, seconds, wers = 0, 0.0, []
            for pcm, said in audio:
                streamer = engine.open_stream({}, StreamSettings(vad=vad))
                texts = []
                for offset in range(0, pcm.size, CHUNK):
                    streamer.feed(pcm[offset : offset + CHUNK])
                    if streamer.due:
                        texts.append(streamer.step().final)
                texts.append(streamer.finish().final)
                decodes += streamer.decodes
                seconds += pcm.size / RATE
                wers.append(word_error_rate(said, " ".join(t.text for t in texts if t is not None)))
            rows.append(
                {
                    "scenario": name,
                    "vad": vad,
                    "decodes_per_session_minute": round(decodes / (seconds / 60), 1),
                    "wer_mean": round(float(np.mean(wers)), 4),
                }
            )
    return {"device": device, "rows": rows}


def budget_summary(figures: dict[str, Any]) -> str:
    lines = [
        "\ndecodes per session-minute, stepped whenever due with no clock (tiny.en):",
        "  scenario    VAD  decodes/session-min  WER mean",
    ]
    for r in figures["rows"]:
        lines.append(
            f"  {r['scenario']:<10}  {'on ' if r['vad'] else 'off'}  {r['decodes_per_session_minute']:>19}  {r['wer_mean']:>7.1%}"
        )
    return "\n".join(lines)
