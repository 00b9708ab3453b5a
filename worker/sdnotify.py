"""systemd's notify protocol (sd_notify(3)), standard library only.

The service manager passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the Linux
abstract namespace); each message is one datagram of ``KEY=VALUE`` lines. Without the variable
(not under systemd, or ``Type=simple``) every call is a no-op, so the agent never needs to know.

``WATCHDOG_USEC`` (set when the unit has ``WatchdogSec=``) is the interval within which systemd
expects ``WATCHDOG=1``; ``WATCHDOG_PID``, when set, names the process it is meant for.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

# sd_watchdog_enabled(3) recommends pinging at half the interval; we use a third so that one
# slow loop iteration (a blocking health check) does not cost a restart.
WATCHDOG_FRACTION = 3


class Notifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; silently does nothing without it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1, or None when systemd does not watch us."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 1_000_000 / WATCHDOG_FRACTION

    def send(self, **fields: str) -> bool:
        """Send one datagram; True when it was delivered. Errors are swallowed: a missing or
        full socket must never take the agent down (systemd then restarts it on its own)."""
        if self._address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._address)
                s.sendall(payload)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        self._last_status = status
        return self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, text: str) -> bool:
        """STATUS=<text>, sent only when it changed."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def reloading(self) -> bool:
        return self.send(RELOADING="1")

    def stopping(self, status: str = "stopping") -> bool:
        self._last_status = status
        return self.send(STOPPING="1", STATUS=status)


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace: leading NUL, no file
    if value.startswith("/"):
        return value
    return None  # sd_notify ignores anything else (e.g. vsock addresses we do not support)


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us without resetting it)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None
