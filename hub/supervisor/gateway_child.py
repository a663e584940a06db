"""Child processes the supervisor keeps running beside its workers: today, the gateway.

The gateway (``python -m hub.gateway``) is started once the frontend is bound, restarted with
backoff if it dies, told to reload on SIGHUP (restarted, once it has drained, where the reload changes
the ``gateway:`` section, since the gateway reads that section only when it starts) and stopped last, after the workers, so that the
requests it carries get their answers during a drain. It runs in its own session, so a Ctrl-C in
the supervisor's terminal reaches the supervisor only, and it watches the supervisor's pid, so it
stops even if the supervisor is killed outright.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from hub.config import GatewaySection, loopback_endpoint
from hub.status import GatewayStatus
from hub.supervisor.process import backoff, describe_exit

log = logging.getLogger("hub.supervisor")

STABLE_SECONDS = 60.0  # a gateway that ran this long before dying starts again without delay
STOP_TIMEOUT = 10.0


class GatewayChild:
    """One supervised gateway process."""

    def __init__(
        self, section: GatewaySection, config_path: Path, frontend: str, log_level: str, log_format: str
    ) -> None:
        self.section = section
        self.command = [
            sys.executable,
            "-m",
            "hub.gateway",
            "--config",
            str(config_path),
            "--hub",
            loopback_endpoint(frontend),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            log_level,
            "--log-format",
            log_format,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.next_start = 0.0
        self.failures = 0
        self.restarts = 0
        self.last_exit = ""
        self.replacing = False  # SIGTERM sent to apply a new section: its exit is no failure

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tick(self, now: float) -> None:
        """Start the gateway when it is due; notice when it has died and schedule its restart."""
        if self.proc is not None and self.proc.poll() is not None and self.replacing:
            log.info(
                "gateway (pid %d) stopped (%s) to apply the new gateway section",
                self.proc.pid,
                describe_exit(self.proc.returncode),
            )
            self.proc, self.replacing, self.failures, self.next_start = None, False, 0, now
        if self.proc is not None and self.proc.poll() is not None:
            self.last_exit = describe_exit(self.proc.returncode)
            self.failures = 1 if now - self.started_at >= STABLE_SECONDS else self.failures + 1
            self.next_start = now + (0.0 if self.failures == 1 else backoff(self.failures - 1))
            log.error(
                "gateway (pid %d) %s; starting it again in %.0f s", self.proc.pid, self.last_exit, self.next_start - now
            )
            self.proc = None
            self.restarts += 1
        if self.proc is None and self.section.enabled and now >= self.next_start:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, start_new_session=True)
            self.started_at = now
            log.info("gateway started (pid %d) for http://%s:%d", self.proc.pid, self.section.host, self.section.port)

    def reload(self, section: GatewaySection) -> None:
        """SIGHUP with the config's new ``gateway:`` section. The same section: the gateway reads its API keys
        file again. Another one (a port, a limit, the keys file's path): the gateway is stopped gracefully and,
        once it has drained, started again with the new section (not at all if it is now disabled)."""
        if section == self.section:
            if self.running:
                assert self.proc is not None
                self.proc.send_signal(signal.SIGHUP)
            return
        changed = [
            f"gateway.{f.name}"
            for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(self.section, f.name)
        ]
        self.section = section
        if not self.running:
            log.info("%s changed: the gateway starts with the new section", ", ".join(changed))
            return
        assert self.proc is not None
        log.warning(
            "%s changed: restarting the gateway (pid %d) to apply it; it finishes the requests it carries first, "
            "and takes no new connection until it is back%s",
            ", ".join(changed),
            self.proc.pid,
            "" if section.enabled else " (gateway.enabled is now false: it stays stopped)",
        )
        self.replacing = True
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM (the gateway finishes what it carries), then SIGKILL after ``STOP_TIMEOUT``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("gateway (pid %d) did not stop within %.0f s: killing it", self.proc.pid, STOP_TIMEOUT)
                self.proc.kill()
                self.proc.wait()
        log.info("gateway stopped (%s)", describe_exit(self.proc.returncode))

    def status(self) -> GatewayStatus:
        return GatewayStatus(
            pid=self.proc.pid if self.running and self.proc is not None else None,
            running=self.running,
            url=f"http://{self.section.host}:{self.section.port}",
            wyoming_port=self.section.wyoming_port or None,
            restarts=self.restarts,
            last_exit=self.last_exit,
        )
