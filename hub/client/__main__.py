"""``python -m hub.client``: transcribe files and read the pool's status from a terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from hub.audio import to_pcm
from hub.client.balance import DNS_SCHEME, HubPool, needs_pool
from hub.client.call import CurveKeys
from hub.client.core import DEFAULT_ENDPOINT
from hub.client.session import StreamSession
from hub.client.sync import HubClient
from hub.errors import HubError
from hub.protocol import SAMPLE_RATE
from hub.status import HubStatus, Percentiles


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub.client", description="ASR Hub command-line client.")
    parser.add_argument(
        "--endpoint",
        action="append",
        help=f"a hub's frontend (default {DEFAULT_ENDPOINT}); repeat it, or give {DNS_SCHEME}NAME:PORT, to balance over many hubs",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up (default 60)")
    parser.add_argument("--client-key", help="CURVE: this client's .key_secret file (python -m hub.keys)")
    parser.add_argument("--server-key", help="CURVE: the hub's public .key file")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("transcribe", help="transcribe an audio file (wav, flac, mp3, ogg, ...)")
    run.add_argument("file")
    run.add_argument("--provider", help="provider name (default: the hub's first enabled provider)")
    run.add_argument("--language", help="language code, e.g. en")
    run.add_argument("--stream", action="store_true", help="print each segment as soon as it is decoded")
    run.add_argument("--json", action="store_true", help="print the whole transcript as JSON")
    status = commands.add_parser("status", help="show the providers and their workers")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument("--watch", action="store_true", help="redraw the table every second until Ctrl-C")
    stream = commands.add_parser("stream", help="play a file into a live session; partials in place, finals as lines")
    stream.add_argument("file")
    stream.add_argument("--provider", help="provider name (default: the hub's first enabled provider)")
    stream.add_argument("--language", help="language code, e.g. en")
    stream.add_argument(
        "--realtime", action="store_true", help="send at the speed of speech (else as fast as possible)"
    )
    stream.add_argument("--chunk-ms", type=int, default=100, help="chunk length in milliseconds (default 100)")
    scale = commands.add_parser("scale", help="set a provider's size at run time, within [min_size, max_size]")
    scale.add_argument("provider")
    scale.add_argument("size", type=int)
    route = commands.add_parser(
        "route",
        help="set a route's weights at run time: route whisper whisper-v1=80 whisper-v2=20 (=100 alone: rollback)",
    )
    route.add_argument("route")
    route.add_argument("weights", nargs="+", metavar="PROVIDER=WEIGHT")
    for sub in (run, status, stream, scale, route):  # the global options are accepted after the command too
        sub.add_argument("--endpoint", action="append", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument("--client-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument("--server-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def parse_weights(items: list[str]) -> dict[str, float]:
    """``["whisper-v1=80", "whisper-v2=20"]`` as weights; ValueError names the item at fault."""
    weights = {}
    for item in items:
        provider, sep, weight = item.partition("=")
        try:
            weights[provider] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not provider or weights[provider] < 0:
            raise ValueError(f"{item!r}: give PROVIDER=WEIGHT with a weight >= 0, e.g. whisper-v1=100")
    return weights


def format_status(status: HubStatus) -> str:
    """The status as a table a person reads at a glance."""
    hub = status.hub
    lines = [
        f"hub {hub.id} pid {hub.pid} on {hub.frontend}  "
        f"{'ready' if status.ready else 'not ready'}{'  (shutting down)' if hub.shutting_down else ''}  "
        f"up {hub.uptime:.0f} s"
    ]
    if (gateway := status.gateway) is not None:
        wyoming = f", Wyoming on port {gateway.wyoming_port}" if gateway.wyoming_port else ""
        state = f"running, pid {gateway.pid}" if gateway.running else "NOT RUNNING"
        exit_ = f", last exit: {gateway.last_exit}" if gateway.last_exit else ""
        lines.append(f"gateway {gateway.url}{wyoming}  {state}  restarts {gateway.restarts}{exit_}")
    for name, p in status.providers.items():
        if not p.enabled or p.pool is None:
            lines.append(f"\n{name} ({p.type}): disabled")
            continue
        mode = "pool" if p.pool_enabled else "single instance"
        pool, f = p.pool, p.pool.figures
        lines.append(
            f"\n{name} ({p.type}, {mode}): size {p.size} [{p.min_size}..{p.max_size}], "
            f"queue {p.queue_depth}/{p.max_queue}{'  DEGRADED' if pool.degraded else ''}"
        )
        rate = "-" if f.success_rate is None else f"{f.success_rate:.1%}"
        lines.append(
            f"  requests {f.requests}: {f.succeeded} ok, {f.failed} failed, {f.rejected} rejected, "
            f"{f.timed_out} timed out ({rate} ok)"
        )
        lines.append(
            f"  wait p50/p95/p99 {_ms(f.wait_ms)}  inference {_ms(f.inference_ms)}  "
            f"utilisation {f.utilization:.0%}  throughput {f.throughput:.2f} audio s/s"
            + ("" if f.mean_batch is None else f"  mean batch {f.mean_batch:.2f}")
        )
        if pool.last_error:
            lines.append(f"  last error: {pool.last_error}")
        if pool.held_back:
            lines.append(f"  scaling held back: {pool.held_back}")
        lines.append(
            f"  {'worker':<16} {'pid':>7}  {'state':<10} {'device':<8} {'jobs':>6} {'fails':>5} {'restarts':>8} {'RSS MiB':>8}  GPU"
        )
        for w in p.workers:
            gpu = w.gpu_error or (
                "-"
                if w.gpu_memory_used_mb is None or w.gpu is None
                else (
                    f"GPU {w.gpu.ordinal}: {w.gpu_memory_used_mb:.0f} MiB of {w.gpu_card_used_mb:.0f}/"
                    f"{w.gpu_card_total_mb:.0f} used, {w.gpu_utilization:.0f}%"
                )
            )
            lines.append(
                f"  {w.id:<16} {w.pid:>7}  {w.state:<10} {w.device:<8} {w.jobs_done:>6} "
                f"{w.consecutive_failures:>5} {w.restarts:>8} {w.rss_mb:>8.0f}  {gpu}"
            )
            if w.last_error:
                lines.append(f"      last error: {w.last_error}")
            if w.sessions:
                lines.append(f"      {w.sessions} live session(s), duty {w.session_duty:.0%}")
            for t in w.session_turns:
                lines.append(f"      session {t.id}: a step every {t.step_s:.2f} s, duty {t.duty:.0%}")
    for name, r in status.routes.items():
        shares = ", ".join(f"{p}={w:g}" for p, w in r.weights.items())
        lines.append(f"\nroute {name}: {shares}{'  (sticky)' if r.sticky else ''}")
        for provider, why in r.rolled_back.items():
            lines.append(f"  ROLLED BACK {provider}: {why}")
        for provider, wer in r.figures.agreement_wer.items():
            lines.append(f"  shadow {provider}: {wer.count} compared, mean WER {wer.mean}")
    return "\n".join(lines)


def _status_text(status: dict[str, Any]) -> str:
    """One hub's table, or one per hub of a pool (``HubPool.status``)."""
    if "hubs" not in status:
        return format_status(HubStatus.from_dict(status))
    return "\n\n".join(
        f"{endpoint}: error {s['error']['code']}: {s['error']['message']}"
        if (typed := HubStatus.of(s)) is None
        else format_status(typed)
        for endpoint, s in status["hubs"].items()
    )


def _ms(summary: Percentiles) -> str:
    values = [summary.p50, summary.p95, summary.p99]
    return "/".join("-" if v is None else f"{v:.0f}" for v in values) + " ms"


def _watch(client: HubClient | HubPool) -> int:
    """Redraw the status table every second, in place, until Ctrl-C."""
    try:
        while True:
            table = _status_text(client.status())
            print("\x1b[H\x1b[2J" + table, flush=True)
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def _stream(client: HubClient | HubPool, args: argparse.Namespace) -> int:
    """Send the file in chunks from this thread while another prints what comes back."""
    pcm = to_pcm(args.file)
    chunk = max(1, args.chunk_ms * SAMPLE_RATE // 1000)
    tty = sys.stdout.isatty()
    with client.open_stream(args.provider, language=args.language) as session:
        printer = threading.Thread(target=_print_events, args=(session, tty), daemon=True)
        printer.start()
        started = time.monotonic()
        for offset in range(0, pcm.size, chunk):
            if args.realtime:
                time.sleep(max(0.0, started + offset / SAMPLE_RATE - time.monotonic()))
            session.send(pcm[offset : offset + chunk])
        session.close()
        printer.join()
    return 0


def _print_events(session: StreamSession, tty: bool) -> None:
    """Finals a line each; on a terminal, the partial text on the line being written (cleared when an
    utterance ends, with VAD on); speech boundaries are not printed."""
    for event in session.results():
        if event.kind == "final":
            print(("\r\x1b[K" if tty else "") + event.text, flush=True)
        elif tty and event.kind in ("partial", "utterance"):
            print("\r\x1b[K" + (event.text if event.kind == "partial" else ""), end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Ctrl-C says it interrupted the command; a reader that stops reading (``status | head``)
    ends it quietly, as it ends other Unix tools."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        return 141  # 128 + SIGPIPE, what a shell reports for a tool the pipe ended


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.client_key) != bool(args.server_key):
        parser.error("--client-key and --server-key go together")
    curve = CurveKeys.load(args.client_key, args.server_key) if args.client_key else None
    endpoints = args.endpoint or [DEFAULT_ENDPOINT]
    pooled = needs_pool(endpoints)
    if pooled and args.command in ("scale", "route"):
        parser.error(f"{args.command} changes one hub: give that hub's --endpoint alone")
    try:
        weights = parse_weights(args.weights) if args.command == "route" else {}
    except ValueError as exc:
        parser.error(str(exc))
    try:
        client = (
            HubPool(endpoints, timeout=args.timeout, curve=curve)
            if pooled
            else HubClient(endpoints[0], timeout=args.timeout, curve=curve)
        )
        with client:
            if args.command == "status":
                if args.watch:
                    return _watch(client)
                status = client.status()
                print(json.dumps(status, indent=2) if args.json else _status_text(status))
                return 0
            if args.command == "stream":
                return _stream(client, args)
            if args.command == "scale":
                assert isinstance(client, HubClient)
                client.scale(args.provider, args.size)
                print(f"{args.provider}: size set to {args.size}")
                return 0
            if args.command == "route":
                assert isinstance(client, HubClient)
                now = client.route(args.route, weights)["weights"]
                print(f"route {args.route}: " + ", ".join(f"{p}={w:g}" for p, w in now.items()))
                return 0
            if args.stream and not args.json:
                stream = client.transcribe_stream(args.file, args.provider, language=args.language)
                for segment in stream:
                    print(f"[{segment.start:7.2f} -> {segment.end:7.2f}] {segment.text}", flush=True)
                return 0
            transcript = client.transcribe(args.file, args.provider, language=args.language)
            print(json.dumps(transcript.to_dict(), indent=2) if args.json else transcript.text)
            return 0
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
