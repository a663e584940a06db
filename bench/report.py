"""From the raw results to what the issue asks: ratios measured in one run, the targets met or
missed (and by how much), and the printed table. Works on the same dict that is saved as
JSON, so a saved run can be re-read and reported again."""

from __future__ import annotations

from typing import Any

from bench import live_turns, long_audio
from bench.procstats import FOREIGN_LIMIT_PCT, disturbed

Result = dict[str, Any]


def _cells(result: Result, kind: str, workers: int | None = None) -> list[Result]:
    return [c for c in result["cells"] if c["kind"] == kind and (workers is None or c["workers"] == workers)]


def _best(result: Result, kind: str, workers: int | None = None) -> Result | None:
    cells = _cells(result, kind, workers)
    return max(cells, key=lambda c: c["audio_per_s"]) if cells else None


def ceiling(result: Result, workers: int, threads: int) -> Result | None:
    """The ceiling for N processes of ``threads`` threads each; for N=1 that is the direct run with those threads."""
    kind = "direct" if workers == 1 else "ceiling"
    return next((c for c in _cells(result, kind, workers) if c["threads"] == threads), None)


def ratios(result: Result) -> dict[str, Any]:
    """Throughput ratios between configurations of this one run (absolute figures depend on the machine)."""
    top = max(c["workers"] for c in _cells(result, "pool"))
    pool, single, best_direct = _best(result, "pool", top), _best(result, "single"), _best(result, "direct")
    assert pool and single and best_direct
    roof = ceiling(result, top, pool["threads"])
    direct = ceiling(result, 1, single["threads"])
    assert roof and direct
    out: dict[str, Any] = {
        "pool_workers": top,
        "pool_vs_single": pool["audio_per_s"] / single["audio_per_s"],
        "pool_vs_ceiling": pool["audio_per_s"] / roof["audio_per_s"],
        "pool_vs_direct": pool["audio_per_s"] / direct["audio_per_s"],
        "pool_vs_best_direct": pool["audio_per_s"] / best_direct["audio_per_s"],
        "best_direct_threads": best_direct["threads"],
        "single_vs_direct": single["audio_per_s"] / direct["audio_per_s"],
        "per_pool_size": {},
    }
    for n in sorted({c["workers"] for c in _cells(result, "pool")}):
        best = _best(result, "pool", n)
        assert best
        roof_n = ceiling(result, n, best["threads"])
        out["per_pool_size"][n] = {
            "best_audio_per_s": best["audio_per_s"],
            "best_at_concurrency": best["concurrency"],
            "vs_single": best["audio_per_s"] / single["audio_per_s"],
            "vs_ceiling": best["audio_per_s"] / roof_n["audio_per_s"] if roof_n else None,
        }
    return out


def _target(name: str, measured: float, limit: float, higher_is_better: bool, unit: str, note: str = "") -> Result:
    met = measured >= limit if higher_is_better else measured <= limit
    gap = measured / limit if limit else float("inf")
    return {
        "name": name,
        "target": limit,
        "measured": measured,
        "unit": unit,
        "met": met,
        "direction": "≥" if higher_is_better else "≤",
        "measured_over_target": gap,
        "note": note,
    }


def targets(result: Result) -> list[Result]:
    """The targets (issues 7, 13, 14 and 17), each with the measured figure and whether it was met."""
    r = result["ratios"]
    return [
        _target("pool throughput vs single instance", r["pool_vs_single"], 1.4, True, "×"),
        _target("pool throughput vs ceiling", r["pool_vs_ceiling"], 0.95, True, "×"),
        *hot_path_targets(result["overhead"], result["load80"], result.get("chunks")),
        *gateway_targets(result["gateway"]),
        *hubpool_targets(result["hubpool"]),
        *(scheduler_targets(result["scheduler"]) if "scheduler" in result else []),
        *(crash_targets(result["crash"]) if "crash" in result else []),
        *(long_audio.targets(result["long_audio"]) if "long_audio" in result else []),
        *(t for figures in result.get("live_turns", {}).values() for t in live_turns.bench_targets(figures)),
    ]


CPU_US_TARGET = 100.0  # issue 17: CPU per echo request in each process


def hot_path_targets(o: Result, load: Result, chunks: Result | None) -> list[Result]:
    """Issue 17: a request's cost in each process, latency over the bare broker, rate, shm vs inline,
    the supervisor under session chunks, percentile accuracy, and p99 at 80 % load against M/D/c."""
    shm, broker = o["hub_shm"], o["bare_broker"]
    cpu = shm["cpu_us_per_request"]
    added = shm["latency_ms"]["p50"] - broker["latency_ms"]["p50"]
    worst = max(o["sizes"], key=lambda row: row["shm"]["p50"] / row["inline"]["p50"])
    sketch = shm["sketch"]
    out = [
        _target(
            f"CPU per echo request, {name} (shared memory)",
            cpu.get(key, 0.0),
            CPU_US_TARGET,
            False,
            "µs",
            f"bare broker: {broker['cpu_us_per_request'].get(key, 0.0):.0f} µs",
        )
        for key, name in (("client", "client"), ("hub", "supervisor"), ("workers", "workers"))
    ]
    out += [
        _target(
            "p50 over the bare two-hop broker (shared memory)",
            added,
            0.15,
            False,
            "ms",
            f"{shm['latency_ms']['p50']:.3f} ms against {broker['latency_ms']['p50']:.3f} ms; inline "
            f"{o['hub_inline']['latency_ms']['p50'] - broker['latency_ms']['p50']:+.3f} ms",
        ),
        _target(
            f"echo requests per second, {o['in_flight']} in flight (shared memory)",
            shm["requests_per_s"],
            5000,
            True,
            "req/s",
            f"inline frames: {o['hub_inline']['requests_per_s']:.0f} req/s",
        ),
        _target(
            "shared memory p50 over inline p50, worst audio length",
            worst["shm"]["p50"] / worst["inline"]["p50"],
            1.0,
            False,
            "×",
            f"worst at {worst['audio_s']:g} s: {worst['shm']['p50']:.2f} against {worst['inline']['p50']:.2f} ms",
        ),
        _target(
            "percentiles' relative error (status sketch, p50/p95/p99 of the loaded echo run)",
            sketch["max_relative_error"],
            0.02,
            False,
            "",
            f"one observation {sketch['observe_ns']:.0f} ns against {sketch['bucket_observe_ns']:.0f} ns for the "
            "bucket histogram it replaced",
        ),
        _target(
            "p99 at 80% load over M/D/c p99 (same arrivals, measured service time)",
            load["cell"]["latency_ms"]["p99"] / load["mdc_p99_ms"],
            1.1,
            False,
            "×",
            f"p99 {load['cell']['latency_ms']['p99']:.0f} ms against {load['mdc_p99_ms']:.0f} ms simulated "
            f"({load['service_ms']:.0f} ms per job)",
        ),
    ]
    if chunks is not None:
        out.append(
            _target(
                f"live-session chunks forwarded per second ({chunks['sessions']} sessions, 50 ms chunks)",
                chunks["chunks_per_s"],
                20000,
                True,
                "chunks/s",
                f"supervisor {chunks['hub_cpu_us_per_chunk']:.0f} µs of CPU per chunk: one core would forward "
                f"{chunks['hub_capacity_chunks_per_s']:.0f}/s",
            )
        )
    return out


def gateway_targets(g: Result) -> list[Result]:
    """The gateway's target (issue 13): HTTP must not be the bottleneck for whisper."""
    return [
        _target(
            f"whisper throughput over HTTP vs the SDK (C={g['whisper_concurrency']})",
            g["whisper_http_vs_sdk"],
            0.97,
            True,
            "×",
            f"{g['whisper_audio_per_s']['http']:.1f} against {g['whisper_audio_per_s']['sdk']:.1f} audio s/s",
        )
    ]


def gateway_lines(g: Result) -> list[str]:
    e, r = g["echo_latency_ms"], g["echo_requests_per_s"]
    return [
        "",
        "gateway (OpenAI-compatible HTTP against the SDK, same hub; echo is 10 ms of audio):",
        f"  echo p50 {e['http']['p50']:.2f} ms over HTTP, {e['sdk']['p50']:.2f} ms through the SDK: +{e['added_p50']:.2f} ms",
        f"  echo {r['http']:.0f} req/s over HTTP, {r['sdk']:.0f} req/s through the SDK ({g['in_flight']} in flight)",
        f"  whisper at C={g['whisper_concurrency']}: {g['whisper_audio_per_s']['http']:.1f} audio s/s over HTTP, "
        f"{g['whisper_audio_per_s']['sdk']:.1f} through the SDK ({g['whisper_http_vs_sdk']:.1%})",
    ]


def hubpool_targets(h: Result) -> list[Result]:
    """Balancing over hubs (issue 15): two hubs of one worker behind a HubPool keep up with one hub of two."""
    a = h["audio_per_s"]
    return [
        _target(
            f"{h['hubs']} hubs of 1 worker behind a HubPool vs 1 hub of {h['hubs']} (C={h['concurrency']})",
            h["pool_vs_one_hub"],
            0.97,
            True,
            "×",
            f"{a['hub_pool']:.1f} against {a['one_hub']:.1f} audio s/s",
        )
    ]


def hubpool_lines(h: Result) -> list[str]:
    e = h["echo_latency_ms"]
    return [
        "",
        f"hub pool ({h['hubs']} hubs of 1 worker behind one HubPool against 1 hub of {h['hubs']} workers, same clips):",
        f"  whisper at C={h['concurrency']}: {h['audio_per_s']['hub_pool']:.1f} audio s/s through the pool, "
        f"{h['audio_per_s']['one_hub']:.1f} from one hub ({h['pool_vs_one_hub']:.1%})",
        f"  echo p50 {e['pool']['p50']:.2f} ms through the pool, {e['client']['p50']:.2f} ms with one client: "
        f"{e['added_p50']:+.2f} ms per request",
    ]


SCHEDULER_CPU_PCT = 50.0  # issue 14: the supervisor's CPU under 200 echo sessions at real time, % of one core


def scheduler_targets(s: Result) -> list[Result]:
    """The scheduler alone (issue 14): the supervisor keeps up with many sessions at real time on part of a core."""
    p99 = s["session_p99_ms"]
    return [
        _target(
            f"supervisor CPU, {s['sessions']} echo sessions at real time on {s['workers']} workers",
            s["hub_cpu_pct"],
            SCHEDULER_CPU_PCT,
            False,
            "% of a core",
            f"chunk-to-partial p99 per session: median {p99['median']:.0f} ms, worst {p99['worst']:.0f} ms",
        )
    ]


def scheduler_lines(s: Result) -> list[str]:
    p99, every, late, u = s["session_p99_ms"], s["all_partials_ms"], s["client_late_ms"], s["usage"]
    return [
        "",
        f"the scheduler alone ({s['sessions']} echo sessions on {s['workers']} workers, {s['chunk_s'] * 1000:.0f} ms "
        f"chunks at real time, a decode every {s['step_ms']} ms of audio; {s['partials']} partials):",
        f"  chunk-to-partial p99 per session: median {p99['median']:.1f} ms, worst {p99['worst']:.1f} ms "
        f"(all partials: p50 {every['p50']:.1f}, p99 {every['p99']:.1f}, max {every['max']:.1f} ms)",
        f"  CPU, % of one core: supervisor {u['hub_pct']:.0f}, workers {u['workers_pct']:.0f}, clients "
        f"{u['clients_pct']:.0f}, other {u['foreign_pct']:.0f}{' *' if disturbed(u) else ''}; the clients sent "
        f"their chunks late by p50 {late['p50']:.1f}, p99 {late['p99']:.1f} ms",
    ]


def crash_targets(c: Result) -> list[Result]:
    """Crash under sessions (issue 14): a resume loses and doubles no final word, and its text is as far from an
    undisturbed run's as two undisturbed runs are from each other."""
    rows = [row for run in c["crash"].values() for row in run["sessions"]]
    clients = ", ".join(c["crash"])
    return [
        _target(
            f"final words lost or doubled at the resume point, {len(rows)} sessions after SIGKILL ({clients})",
            sum(r["lost"] + r["doubled"] for r in rows),
            0,
            False,
            "words",
            f"resumes {[r['resumes'] for r in rows]}, gap {max(r['gap_s'] or 0.0 for r in rows):.2f} s at most",
        ),
        _target(
            "WER of a resumed session against an undisturbed run, within the run-to-run noise",
            max(r["wer_vs_undisturbed"] for r in rows),
            c["noise"]["max"],
            False,
            "",
            "the target is the largest WER between the first undisturbed run of the same sessions and another",
        ),
    ]


def crash_lines(c: Result) -> list[str]:
    noise = c["noise"]
    kills = ", ".join(
        f"{client} {run['killed_at_s']} s (resumed from {', '.join(f'{x:g}' for x in run['resumed_from_s'])} s)"
        for client, run in c["crash"].items()
    )
    window = f"stream.window_seconds {c['window_s']:g}" if c["window_s"] else "the default window"
    spots = sum(j["lost"] + j["doubled"] for j in noise["junction"])
    lines = [
        "",
        f"crash under sessions ({c['sessions']} tiny.en sessions of {min(c['audio_s']):.0f}-{max(c['audio_s']):.0f} s at real "
        f"time on one worker, {window}; SIGKILL into the audio: {kills}; load {c['load']['before']} before, "
        f"{c['load']['after']} after):",
        f"  {len(c['undisturbed_wer_vs_reference'])} undisturbed runs: WER between the first and the others, per session, at "
        f"most {', '.join(f'{w:.1%}' for w in noise['wer'])} ({spots} words lost or doubled at the same points in the first "
        f"two); against the reference text {c['undisturbed_wer_vs_reference']}; a session's partials came "
        f"{c['undisturbed_wait_s']['p50']} s apart (p50), {c['undisturbed_wait_s']['max']} s at most",
        "  client  session  words equal  lost  doubled  WER vs undisturbed  WER vs reference  moved s  gap s  resumes",
    ]
    for client, run in c["crash"].items():
        for i, r in enumerate(run["sessions"]):
            lines.append(
                f"  {client:<6}  {i + 1:>7}  {'yes' if r['words_equal'] else 'no':>11}  {r['lost']:>4}  {r['doubled']:>7}"
                f"  {r['wer_vs_undisturbed']:>18.1%}  {r['wer_vs_reference']:>16.1%}  {r['moved_s']!s:>7}  {r['gap_s']!s:>5}"
                f"  {r['resumes']:>7}"
            )
    verdict = "met" if c["met"] else "MISSED"
    lines.append(
        f"  verdict: {verdict} (no word lost or doubled at the resume point, WER vs undisturbed <= {noise['max']:.1%}); "
        f"shared-memory segments left: {len(c['shm_left'])}"
    )
    return lines


def _cell_row(c: Result) -> str:
    lat = c["latency_ms"]
    rss = sum(c["rss_mb"]) / len(c["rss_mb"]) if c["rss_mb"] else float("nan")
    u = c["usage"]
    infer = f"{c['inference_ms_p50']:>7.0f}" if c["inference_ms_p50"] is not None else f"{'-':>7}"
    conc = "open" if c["kind"] == "load80" else str(c["concurrency"])
    return (
        f"{c['kind']:<8}{c['workers']:>3}{c['threads']:>4}{conc:>5}{c['jobs']:>5}"
        f"{c['audio_per_s']:>9.1f}{c['requests_per_s']:>7.2f}{lat['p50']:>8.0f}{lat['p95']:>8.0f}{lat['p99']:>8.0f}{infer}"
        f"{c['rtf_p50']:>7.3f}{rss:>7.0f}{u.get('machine_pct', 0):>6.0f}{u.get('workers_pct', 0):>6.0f}"
        f"{u.get('hub_pct') or 0:>5.0f}{u.get('foreign_pct', 0):>6.0f}{' *' if disturbed(c['usage']) else ''}"
    )


def format_table(result: Result) -> str:
    """The whole report as text: matrix, 80% load, overhead, transport, ratios, targets."""
    m = result["meta"]
    lines = [
        (
            f"ASR Hub benchmark {m['timestamp']}: {m['machine']['cores']} cores ({m['machine']['cpu']}), "
            f"device {m['device']}, tiny.en, {len(result['clips'])} clips of "
            f"{min(result['clips']):.1f}-{max(result['clips']):.1f} s, {'quick' if m['quick'] else 'full'} run"
        ),
        "",
        "kind      N thr    C jobs  audio/s  req/s  p50 ms  p95 ms  p99 ms  infer    RTF  RSS MB  cpu%  wrk%  hub% other",
    ]
    lines += [_cell_row(c) for c in result["cells"]]
    load = result["load80"]
    lines += [
        "",
        (
            "(N thr: processes × threads each; infer: the worker's own time per job, p50; RSS: peak per model "
            "process; cpu%: machine, all cores; wrk%, hub%, other: % of one core for the workers, the supervisor, "
            "and everything else)"
        ),
    ]
    lines.append(
        _cell_row(load["cell"]) + f"   <- open loop at {load['offered_rps']:.2f} req/s "
        f"(80% of {load['peak_rps']:.2f}); unloaded p50 {load['unloaded_p50_ms']:.0f} ms"
    )
    lines += ["", "start-up (process start to ready, to first answer; supervisor peak RSS):"]
    lines += [
        f"  {name:<10} {s['ready_s']:5.1f} s {s['first_answer_s']:5.1f} s {s['hub_rss_mb']:6.0f} MB"
        for name, s in result["startup"].items()
    ]
    o = result["overhead"]
    lines += [
        "",
        (
            "overhead (echo provider, 10 ms of audio; latency one at a time, req/s with "
            f"{o['in_flight']} in flight; CPU µs per request):"
        ),
        "                 p50 ms  p99 ms    req/s  client     hub workers  other (% of a core)",
    ]
    for key, name in (
        ("bare_1hop", "bare ZeroMQ"),
        ("bare_broker", "bare broker"),
        ("hub_shm", "hub, shm"),
        ("hub_inline", "hub, inline"),
    ):
        f, cpu = o[key], o[key]["cpu_us_per_request"]
        lines.append(
            f"  {name:<13}{f['latency_ms']['p50']:>8.3f}{f['latency_ms']['p99']:>8.3f}"
            f"{f['requests_per_s']:>9.0f}{cpu.get('client', 0):>8.0f}{cpu.get('hub', 0):>8.0f}"
            f"{cpu.get('workers', 0):>8.0f}{f['usage']['foreign_pct']:>7.0f}{' *' if disturbed(f['usage']) else ''}"
        )
    lines += ["", "shared memory vs inline (echo, p50 / p99 ms; bytes through the supervisor per request):"]
    for row in o["sizes"]:
        lines.append(
            f"  {row['audio_s']:>5g} s   shm {row['shm']['p50']:8.2f} / {row['shm']['p99']:8.2f}  "
            f"({row['shm_bytes_through_hub']} B)   inline {row['inline']['p50']:8.2f} / "
            f"{row['inline']['p99']:8.2f}  ({row['inline_bytes_through_hub']} B)"
        )
    lines += gateway_lines(result["gateway"])
    lines += hubpool_lines(result["hubpool"])
    if "scheduler" in result:
        lines += scheduler_lines(result["scheduler"])
    if "crash" in result:
        lines += crash_lines(result["crash"])
    if "long_audio" in result:
        lines += long_audio.lines(result["long_audio"])
    r = result["ratios"]
    lines += [
        "",
        (
            f"ratios (throughput, this run): pool N={r['pool_workers']} vs single {r['pool_vs_single']:.2f}×, "
            f"vs ceiling {r['pool_vs_ceiling']:.1%}, vs direct {r['pool_vs_direct']:.2f}× "
            f"(vs the best direct run, {r['best_direct_threads']} thread(s): {r['pool_vs_best_direct']:.2f}×); "
            f"single vs direct {r['single_vs_direct']:.2f}×"
        ),
    ]
    for n, p in r["per_pool_size"].items():
        roof = f"{p['vs_ceiling']:.1%} of its ceiling" if p["vs_ceiling"] else "no ceiling measured"
        lines.append(
            f"  pool N={n}: best {p['best_audio_per_s']:.1f} audio s/s at C={p['best_at_concurrency']}, "
            f"{p['vs_single']:.2f}× single, {roof}"
        )
    runs = [
        *result["cells"],
        result["load80"]["cell"],
        *(o[k] for k in ("bare_1hop", "bare_broker", "hub_shm", "hub_inline")),
    ]
    marked = [c for c in runs if disturbed(c["usage"])]
    if marked:
        lines += [
            "",
            f"* {len(marked)} measurement(s) ran while other processes used more than {FOREIGN_LIMIT_PCT:.0f}% of a core "
            "(column 'other'): their figures, and the ratios built on them, are doubtful: rerun on a quiet machine.",
        ]
    lines += ["", "targets:"]
    lines += [target_line(t) for t in result["targets"]]
    return "\n".join(lines)


def target_line(t: Result) -> str:
    """One target's verdict, as the table prints it."""
    return (
        f"  [{'met ' if t['met'] else 'MISS'}] {t['name']}: {t['measured']:.3g} {t['unit']} "
        f"(target {t['direction']} {t['target']:g}){'; ' + t['note'] if t['note'] else ''}"
    )
