"""systemd notify protocol in pure Python (READY, WATCHDOG, STATUS, STOPPING); a no-op without systemd.

Watchdog pings are health-gated: :class:`Watchdog` pings only while every registered loop has
beaten recently, so a hung loop makes systemd restart the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["Notifier", "Watchdog"]

log = logging.getLogger("fedmfs.adapters.sdnotify")


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET`` (read when created, not at import)."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ok_pid = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and ok_pid else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.connect(self.address)
                s.sendall("\n".join(fields).encode())
            return True
        except OSError as e:  # systemd gone: nothing to tell, keep serving
            log.warning("sd_notify failed: %s", e)
            return False

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


class Watchdog:
    """Pings at half the watchdog interval, only while every loop's heartbeat is fresh."""

    def __init__(self, notifier: Notifier, clock=time.monotonic):
        self.notifier = notifier
        self.clock = clock
        self.beats: dict[str, float] = {}
        self._last_ping = 0.0

    def beat(self, loop: str) -> None:
        self.beats[loop] = self.clock()

    def maybe_ping(self) -> bool:
        period = self.notifier.watchdog_seconds
        if not period:
            return False
        now = self.clock()
        if now - self._last_ping < period / 2:
            return False
        if any(now - t > period / 2 for t in self.beats.values()):
            return False   # a loop is stuck: let systemd notice
        self._last_ping = now
        return self.notifier.watchdog()
