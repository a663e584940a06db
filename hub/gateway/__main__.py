"""``python -m hub.gateway``: the HTTP/WebSocket/Wyoming gateway, standalone or started by the supervisor.

Standalone: ``python -m hub.gateway --hub tcp://HOST:5555 [--host 127.0.0.1] [--port 8000] [--wyoming-port 10300]``;
``--hub`` repeated, or ``--hub dns+tcp://NAME:PORT``, fronts many hubs. With ``--config`` the ``gateway:`` section
of a hub config gives the defaults and the flags override it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

from hub import logs
from hub.client.balance import DNS_SCHEME, parse_endpoints
from hub.config import (
    ConfigError,
    GatewaySection,
    HubSection,
    check_gateway_budget,
    check_gateway_exposure,
    load_config,
    loopback_endpoint,
)
from hub.gateway.server import serve
from hub.gateway.state import Settings


def settings_from(args: argparse.Namespace) -> tuple[Settings, HubSection]:
    """The config file's gateway section (or the defaults), with the command line's flags on top."""
    if args.config:
        config = load_config(args.config)
        section, hub = config.gateway, config.hub
    else:
        section, hub = GatewaySection(), HubSection()
    flags = {
        "host": args.host,
        "port": args.port,
        "wyoming_port": args.wyoming_port,
        "api_keys_file": args.api_keys_file,
        "allow_insecure": args.allow_insecure or None,
        "client_secret_key": args.client_key,
        "server_public_key": args.server_key,
    }
    section = dataclasses.replace(section, **{k: v for k, v in flags.items() if v is not None})
    if bool(section.client_secret_key) != bool(section.server_public_key):
        raise ConfigError("--client-key and --server-key go together")
    check_gateway_exposure(section)
    check_gateway_budget(section, hub)
    endpoints = tuple(args.hub or [loopback_endpoint(hub.frontend)])
    try:
        parse_endpoints(endpoints)
    except ValueError as exc:
        raise ConfigError(f"--hub: {exc}") from None
    return Settings(hubs=endpoints, section=section, max_audio_seconds=hub.max_audio_seconds), hub


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hub.gateway", description="Serve the hub over HTTP, WebSocket and Wyoming."
    )
    parser.add_argument(
        "--hub",
        action="append",
        help="the hub's ZeroMQ endpoint (default: hub.frontend of --config, else tcp://127.0.0.1:5555); repeat it, "
        f"or give {DNS_SCHEME}NAME:PORT, to balance requests over many hubs",
    )
    parser.add_argument("--config", help="a hub config file whose gateway: section gives the defaults")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--wyoming-port", type=int, help="Wyoming TCP port (default: off; Home Assistant uses 10300)")
    parser.add_argument("--api-keys-file", help="file of API keys, one a line (clients send Authorization: Bearer KEY)")
    parser.add_argument("--allow-insecure", action="store_true", help="allow binding beyond loopback without API keys")
    parser.add_argument("--client-key", help="CURVE, for a hub that requires it: the gateway's .key_secret file")
    parser.add_argument("--server-key", help="CURVE: the hub's public .key file (every hub's, with many)")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING ... (default: hub.log_level or INFO)")
    parser.add_argument("--log-format", choices=logs.FORMATS, help="text or json lines (default: hub.log_format)")
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by the supervisor
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings, hub = settings_from(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or hub.log_level, args.log_format or hub.log_format)
    return asyncio.run(serve(settings, args.parent_pid))


if __name__ == "__main__":
    sys.exit(main())
