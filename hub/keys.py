"""``python -m hub.keys DIR NAME``: make a CURVE key pair for the hub or for one client.

It writes ``DIR/NAME.key`` (public: hand it out) and ``DIR/NAME.key_secret`` (keep it).
The supervisor takes its secret file as ``hub.curve.server_secret_key`` and a folder of
allowed clients' public files as ``hub.curve.allowed_clients``; a client passes its own
secret file and the server's public file to ``HubClient``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq.auth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.keys", description="Make a CURVE key pair for ASR Hub.")
    parser.add_argument("directory", type=Path, help="where to write NAME.key and NAME.key_secret")
    parser.add_argument("name", help="e.g. server, or the client's name")
    args = parser.parse_args(argv)
    args.directory.mkdir(parents=True, exist_ok=True)
    if (args.directory / f"{args.name}.key_secret").exists():
        print(f"{args.directory / args.name}.key_secret exists already; not overwriting it", file=sys.stderr)
        return 1
    public, secret = zmq.auth.create_certificates(str(args.directory), args.name)
    os.chmod(secret, 0o600)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
