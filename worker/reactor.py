"""One thread that waits on every running job at once: process exits, output pipes, worker sockets
and timeouts.

A run used to hold a thread for its whole life (plus a second one reading its output), so every
start and every exit cost thread wake-ups and GIL hand-offs. The reactor is an asyncio event loop
used through its callback API only (``add_reader``, ``call_later``): job processes are watched
through pidfds and their pipes, Python workers through their sockets, and nothing in it may
block. Other threads reach it with :meth:`Reactor.call_soon`, one wake-up for a whole batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# How long stop() waits for the loop thread to finish its current callback.
STOP_JOIN_S = 5.0


class Reactor:
    """An event loop on its own daemon thread."""

    def __init__(self, name: str = "reactor") -> None:
        self._name = name
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Reactor:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread (from any thread)."""
        if self.in_loop():
            self.loop.call_soon(fn, *args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn()`` on the loop thread and return its result (from another thread)."""
        if self.in_loop():
            return fn()
        done = threading.Event()
        box: list[Any] = []

        def call() -> None:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(call)
        if not done.wait(timeout):
            raise TimeoutError(f"{self._name}: no answer within {timeout}s")
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def wait_for(self, start: Callable[..., None], *args: Any) -> Any:
        """Call ``start(*args, done)`` on the loop thread and return what it passes to
        ``done`` (from another thread): the blocking form of a callback-style operation.
        If ``start`` raises instead, the exception is raised here (not left to the loop's
        handler, with this thread waiting forever for a ``done`` that never comes)."""
        finished = threading.Event()
        box: list[Any] = []
        failed: list[BaseException] = []

        def done(result: Any) -> None:
            box.append(result)
            finished.set()

        def begin() -> None:
            try:
                start(*args, done)
            except BaseException as exc:
                failed.append(exc)
                finished.set()

        self.call_soon(begin)
        finished.wait()
        if failed and not box:
            raise failed[0]
        return box[0]

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(STOP_JOIN_S)
        if not thread.is_alive():
            self.loop.close()
