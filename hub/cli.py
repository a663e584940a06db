"""``python -m hub.client``: transcribe files and read the pool's status from a terminal."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hub.client import DEFAULT_ENDPOINT, HubClient
from hub.errors import HubError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub.client", description="ASR Hub command-line client.")
    parser.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"the hub's frontend (default {DEFAULT_ENDPOINT})")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before giving up (default 60)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("transcribe", help="transcribe an audio file (wav, flac, mp3, ogg, ...)")
    run.add_argument("file")
    run.add_argument("--provider", help="provider name (default: the hub's first enabled provider)")
    run.add_argument("--language", help="language code, e.g. en")
    run.add_argument("--stream", action="store_true", help="print each segment as soon as it is decoded")
    run.add_argument("--json", action="store_true", help="print the whole transcript as JSON")
    status = commands.add_parser("status", help="show the providers and their workers")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    scale = commands.add_parser("scale", help="set a provider's size at run time, within [min_size, max_size]")
    scale.add_argument("provider")
    scale.add_argument("size", type=int)
    for sub in (run, status, scale):
        sub.add_argument("--endpoint", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def format_status(status: dict[str, Any]) -> str:
    """The status as a table a person reads at a glance."""
    hub = status["hub"]
    lines = [
        f"hub {hub['id']} pid {hub['pid']} on {hub['frontend']}  "
        f"{'ready' if hub['ready'] else 'not ready'}{'  (shutting down)' if hub['shutting_down'] else ''}  "
        f"up {hub['uptime']:.0f} s"
    ]
    for name, p in status["providers"].items():
        if not p["enabled"]:
            lines.append(f"\n{name} ({p['type']}): disabled")
            continue
        pool = "pool" if p["pool_enabled"] else "single instance"
        lines.append(
            f"\n{name} ({p['type']}, {pool}): size {p['size']} [{p['min_size']}..{p['max_size']}], "
            f"queue {p['queue_depth']}/{p['max_queue']}{'  DEGRADED' if p['degraded'] else ''}"
        )
        if p["last_error"]:
            lines.append(f"  last error: {p['last_error']}")
        if p["held_back"]:
            lines.append(f"  scaling held back: {p['held_back']}")
        lines.append(f"  {'worker':<16} {'pid':>7}  {'state':<10} {'device':<8} {'jobs':>6}")
        for w in p["workers"]:
            lines.append(f"  {w['id']:<16} {w['pid']:>7}  {w['state']:<10} {w['device']:<8} {w['jobs_done']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with HubClient(args.endpoint, timeout=args.timeout) as client:
            if args.command == "status":
                status = client.status()
                print(json.dumps(status, indent=2) if args.json else format_status(status))
                return 0
            if args.command == "scale":
                client.scale(args.provider, args.size)
                print(f"{args.provider}: size set to {args.size}")
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
