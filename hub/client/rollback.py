"""``python -m hub.client.rollback CONFIG [--undo] [--signal]``: the rollback switch, flipped in the config file.

Rolling back sets ``pool.enabled: false`` for every provider (one worker, one job at a
time: the old single-instance behaviour); ``--undo`` sets it back to true. The file is
edited line by line, so its comments and layout survive, then checked through the config
loader before it is written (the old text is kept as ``CONFIG.bak``). ``--signal`` sends
SIGHUP to the supervisor running that config (found by its pid file), which replaces its
workers one at a time without failing a request. ``scripts/rollback.sh`` is this with
``--signal``.

``--route NAME`` is the other rollback, for a gray release: every request for the route goes to
its baseline (the provider the config gives the most weight, or ``--to PROVIDER``) at once,
without a restart or a SIGHUP, by the same request as ``python -m hub.client route NAME P=100``.
The config file is left as it is; a later reload keeps this until the route's section changes.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

import yaml

from hub.config import (
    ConfigError,
    HubConfig,
    baseline_of,
    load_config,
    loopback_endpoint,
    parse_config,
    pid_file,
)
from hub.errors import HubError

_KEY = re.compile(r"^(\s*)([\w.-]+):\s*(.*?)\s*(#.*)?$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _children(lines: list[str], start: int, end: int) -> list[tuple[str, int]]:
    """(key, line index) of the mapping entries directly under the key on line ``start - 1``."""
    body = [i for i in range(start, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    if not body:
        return []
    depth = _indent(lines[body[0]])
    return [(m.group(2), i) for i in body if _indent(lines[i]) == depth and (m := _KEY.match(lines[i]))]


def _block_end(lines: list[str], start: int) -> int:
    """The end of the block opened by the key on line ``start``."""
    depth = _indent(lines[start])
    for i in range(start + 1, len(lines)):
        if lines[i].strip() and not lines[i].lstrip().startswith("#") and _indent(lines[i]) <= depth:
            return i
    return len(lines)


def _set_value(line: str, value: str) -> str:
    """Replace a ``key: value`` line's value, keeping a trailing comment where it was."""
    m = re.match(r"^(\s*[\w.-]+:\s*)(\S+)(\s*)(#.*)?$", line)
    if m is None:
        raise ConfigError(f"cannot edit the line {line.strip()!r}; edit the file by hand")
    gap = m.group(3)
    if m.group(4):
        gap = " " * max(1, len(gap) - (len(value) - len(m.group(2))))
    return f"{m.group(1)}{value}{gap}{m.group(4) or ''}".rstrip()


def set_pool_enabled(text: str, enabled: bool) -> str:
    """``text`` with ``pool.enabled`` set for every provider that has a ``pool:`` section."""
    value = "true" if enabled else "false"
    lines = text.splitlines()
    top = _children(lines, 0, len(lines)) if lines else []
    providers = next((i for key, i in top if key == "providers"), None)
    if providers is None:
        raise ConfigError("the config has no providers: section")
    for _, line in reversed(_children(lines, providers + 1, _block_end(lines, providers))):
        pool = next((i for key, i in _children(lines, line + 1, _block_end(lines, line)) if key == "pool"), None)
        if pool is None:
            continue  # no pool section: a single instance already
        head = _KEY.match(lines[pool])
        assert head is not None
        inline = head.group(3)
        if inline.startswith("{"):
            if re.search(r"\benabled:\s*\w+", inline):
                inline = re.sub(r"\benabled:\s*\w+", f"enabled: {value}", inline)
            else:
                inline = "{enabled: " + value + (", " + inline[1:].lstrip() if inline[1:].strip() != "}" else "}")
            lines[pool] = f"{head.group(1)}pool: {inline}" + (f"  {head.group(4)}" if head.group(4) else "")
            continue
        entries = _children(lines, pool + 1, _block_end(lines, pool))
        flag = next((i for key, i in entries if key == "enabled"), None)
        if flag is not None:
            lines[flag] = _set_value(lines[flag], value)
        else:
            depth = _indent(lines[entries[0][1]]) if entries else _indent(lines[pool]) + 2
            lines.insert(pool + 1, " " * depth + f"enabled: {value}")
    return "\n".join(lines) + "\n"


def _check(text: str, base_dir: Path, enabled: bool) -> None:
    config = parse_config(yaml.safe_load(text), base_dir)
    raw = yaml.safe_load(text)["providers"]
    for name, provider in config.providers.items():
        if isinstance(raw.get(name), dict) and "pool" in raw[name] and provider.pool.enabled is not enabled:
            raise ConfigError(f"providers.{name}.pool.enabled could not be set; edit the file by hand")


def route_rollback(config: HubConfig, route: str, to: str | None) -> int:
    """Send every request for ``route`` to its baseline on the hub running ``config``."""
    from hub.client import HubClient  # only this mode talks to the hub

    section = config.routes.get(route)
    if section is None:
        print(
            f"rollback: the config has no route {route!r} (routes: {', '.join(config.routes) or 'none'})",
            file=sys.stderr,
        )
        return 2
    target = to or baseline_of(section.weights, tuple(section.weights))
    if config.hub.curve.enabled:
        print(
            "rollback: the hub requires CURVE keys; run python -m hub.client --client-key K --server-key S "
            f"route {route} {target}=100",
            file=sys.stderr,
        )
        return 2
    try:
        with HubClient(loopback_endpoint(config.hub.frontend), timeout=10.0) as client:
            weights = client.route(route, {target: 100})["weights"]
    except HubError as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(f"route {route}: every request now goes to {target} ({', '.join(f'{p}={w:g}' for p, w in weights.items())})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.client.rollback", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--undo", action="store_true", help="set pool.enabled back to true")
    parser.add_argument("--signal", action="store_true", help="then SIGHUP the supervisor running this config")
    parser.add_argument("--route", help="roll this route back to its baseline instead (the running hub, not the file)")
    parser.add_argument(
        "--to", help="with --route: the provider to send everything to (default: the config's heaviest)"
    )
    args = parser.parse_args(argv)
    if args.route:
        try:
            return route_rollback(load_config(args.config), args.route, args.to)
        except ConfigError as exc:
            print(f"rollback: {exc}", file=sys.stderr)
            return 2
    try:
        text = args.config.read_text()
        new = set_pool_enabled(text, enabled=args.undo)
        _check(new, args.config.resolve().parent, enabled=args.undo)
    except (OSError, ConfigError, yaml.YAMLError) as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 2
    args.config.with_name(args.config.name + ".bak").write_text(text)
    args.config.write_text(new)
    print(f"{args.config}: pool.enabled set to {str(args.undo).lower()} for every provider (old text in .bak)")
    if args.signal:
        path = pid_file(load_config(args.config))
        try:
            pid = int(path.read_text())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            print(
                f"rollback: no running supervisor found through {path} ({exc}); start it with this config",
                file=sys.stderr,
            )
            return 1
        print(f"sent SIGHUP to the supervisor (pid {pid}): it replaces its workers one at a time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
