"""The reactor's blocking helper: an operation that raises instead of calling back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from worker.reactor import Reactor


def test_wait_for_raises_what_start_raised_instead_of_waiting_forever() -> None:
    reactor = Reactor("test")
    reactor.start()
    try:
        def broken(value: int, done: Callable[[int], None]) -> None:
            raise IndexError(f"no argv for {value}")

        def fine(value: int, done: Callable[[int], None]) -> None:
            reactor.loop.call_soon(done, value * 2)

        with pytest.raises(IndexError, match="no argv for 3"):
            reactor.wait_for(broken, 3)
        assert reactor.wait_for(fine, 21) == 42  # the loop serves on
    finally:
        reactor.stop()
