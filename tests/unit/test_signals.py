"""worker.signals: handlers that never take a lock, read by the main thread."""

from __future__ import annotations

import os
import signal
import threading
import time

from worker.signals import SignalInbox


def test_a_signal_is_seen_at_once_and_only_once() -> None:
    inbox = SignalInbox()
    old = signal.getsignal(signal.SIGHUP)
    inbox.install(signal.SIGHUP)
    try:
        assert inbox.wait(0.01) == set()
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGHUP)).start()
        began = time.monotonic()
        assert inbox.wait(5.0) == {signal.SIGHUP}
        assert time.monotonic() - began < 1.0  # woken by the pipe, not the timeout
        assert inbox.wait(0.01) == set()
    finally:
        signal.signal(signal.SIGHUP, old)
        inbox.close()


def test_a_storm_of_signals_never_wedges_the_main_thread() -> None:
    """Another thread fires SIGHUP as fast as it can while the main thread waits in a loop with
    tiny timeouts (the agent's shape): every wait returns, and the last signal is seen."""
    inbox = SignalInbox()
    old = signal.getsignal(signal.SIGHUP)
    inbox.install(signal.SIGHUP)
    stop = threading.Event()
    sent = [0]

    def fire() -> None:
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGHUP)
            sent[0] += 1

    shooter = threading.Thread(target=fire, daemon=True)
    try:
        shooter.start()
        seen = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen += len(inbox.wait(0.0005))
        stop.set()
        shooter.join(5)
        assert sent[0] > 100 and seen > 0
        os.kill(os.getpid(), signal.SIGHUP)
        assert inbox.wait(5.0) == {signal.SIGHUP}
    finally:
        stop.set()
        signal.signal(signal.SIGHUP, old)
        inbox.close()
