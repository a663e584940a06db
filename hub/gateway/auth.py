"""Optional API keys: ``Authorization: Bearer KEY`` checked against a file of keys, one a line.

The file is read at start and again on SIGHUP, so keys can be added or revoked without a restart.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from hub.gateway.errors import ApiError

log = logging.getLogger("hub.gateway")


class ApiKeys:
    def __init__(self, path: str) -> None:
        self.path = path
        self.keys: frozenset[str] = frozenset()
        self.reload()

    @property
    def required(self) -> bool:
        return bool(self.path)

    def reload(self) -> None:
        """Read the file again; a file that cannot be read keeps the keys in force (and says so). Without a
        file (no keys required) there is nothing to read, on a SIGHUP either."""
        if not self.path:
            return
        try:
            lines = Path(self.path).read_text().splitlines()
        except OSError as exc:
            log.error("API keys not reloaded, the previous keys stay in force: %s: %s", self.path, exc.strerror)
            return
        self.keys = frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        log.info("API keys loaded from %s (%d key(s))", self.path, len(self.keys))

    def check(self, authorization: str | None) -> None:
        """Raise ``ApiError(UNAUTHORIZED)`` unless the header carries a known key (or no keys are required)."""
        if not self.required:
            return
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError("UNAUTHORIZED", "missing API key: send the header 'Authorization: Bearer YOUR_KEY'")
        if not any(hmac.compare_digest(key.strip(), known) for known in self.keys):
            raise ApiError("UNAUTHORIZED", "incorrect API key: it is not in this gateway's API keys file")
