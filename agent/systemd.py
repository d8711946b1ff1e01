"""systemd integration: readiness, reload, stop, status and watchdog (sd_notify).

deploy/systemd/genclip@.service is `Type=notify` (systemd 252 has no notify-reload) with
`ExecReload=kill -HUP`; the RELOADING=1 + MONOTONIC_USEC sent around a reload also suit a
`Type=notify-reload` unit on systemd >= 253.

Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op, so the agent runs the
same from a terminal, a container or a test.
"""

from __future__ import annotations

import os
import time

import sdnotify

from agent.logs import get_logger

log = get_logger(__name__)


class SystemdNotifier:
    """Sends sd_notify(3) messages through `sdnotify`; failures are logged once, never raised."""

    def __init__(self) -> None:
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._warned = False
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return
        try:
            self._notifier = sdnotify.SystemdNotifier(debug=True)
        except Exception as exc:  # sdnotify re-raises whatever connect() raised
            log.warning("cannot reach systemd's notify socket; not notifying", socket=address, error=str(exc))

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def notify(self, *fields: str) -> None:
        """Send `KEY=value` fields in one datagram."""
        if self._notifier is None:
            return
        try:
            self._notifier.notify("\n".join(fields))
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("systemd notification failed", fields=list(fields), error=str(exc))

    def ready(self) -> None:
        """Start-up finished; also ends a reload begun with reloading()."""
        self.notify("READY=1")

    def reloading(self) -> None:
        """A reload began; systemd >= 253 needs MONOTONIC_USEC to match it to the request. Follow with ready()."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        """One line shown by `systemctl status`; a newline would start another field, so none is sent."""
        self.notify("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between watchdog() pings (half of WATCHDOG_USEC), or None when this process is not watched."""
        usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
        if not usec:
            return None
        try:
            if pid and int(pid) != os.getpid():
                return None
            value = int(usec)
        except ValueError:
            log.warning("ignoring malformed watchdog variables", WATCHDOG_USEC=usec, WATCHDOG_PID=pid)
            return None
        return value / 2 / 1_000_000 if value > 0 else None
