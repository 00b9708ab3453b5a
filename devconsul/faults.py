"""Fault injection per simulated agent (node): ``ok``, ``refuse`` or ``hang``.

- refuse: every request on that node's endpoint, open connections included, is dropped
  without an answer (the connection is reset), as if the agent had died.
- hang: requests are read and never answered until the fault is lifted, as if the agent or
  the network path to it were frozen.
Only the Consul API is affected; the ``/_dev/`` control API always answers.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

MODES = ("ok", "refuse", "hang")


def reset(sock: socket.socket) -> None:
    """Make the next close send RST, and wake any reader blocked on the socket."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class FaultBoard:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._modes: dict[str, str] = {}
        self._conns: dict[str, set[socket.socket]] = {}
        self._stopped = False

    def set(self, node: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        with self._cond:
            self._modes[node] = mode
            self._cond.notify_all()
            doomed = list(self._conns.get(node, ())) if mode == "refuse" else []
        for sock in doomed:
            reset(sock)

    def mode(self, node: str) -> str:
        with self._cond:
            return self._modes.get(node, "ok")

    def snapshot(self) -> dict[str, str]:
        with self._cond:
            return {n: m for n, m in self._modes.items() if m != "ok"}

    def pass_gate(self, node: str) -> bool:
        """Block while the node hangs; True if the request may be answered."""
        with self._cond:
            while self._modes.get(node) == "hang" and not self._stopped:
                self._cond.wait()
            return self._modes.get(node, "ok") != "refuse"

    def track(self, node: str, sock: socket.socket) -> None:
        with self._cond:
            self._conns.setdefault(node, set()).add(sock)

    def untrack(self, node: str, sock: socket.socket) -> None:
        with self._cond:
            self._conns.get(node, set()).discard(sock)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
