"""During an outage the agent's loops log each failed attempt; repeats of the same event within
30 s are dropped, and the next line that passes says how many were."""

from __future__ import annotations

import pytest
import structlog

from worker.logs import RepeatFilter


def test_repeats_within_the_window_are_dropped_and_counted() -> None:
    now = [0.0]
    f = RepeatFilter(frozenset({"check_pass_failed"}), 30.0, lambda: now[0])
    assert f(None, "warning", {"event": "check_pass_failed"}) == {"event": "check_pass_failed"}
    for t in (0.7, 1.4, 29.0):
        now[0] = t
        with pytest.raises(structlog.DropEvent):
            f(None, "warning", {"event": "check_pass_failed"})
    now[0] = 30.5
    assert f(None, "warning", {"event": "check_pass_failed"}) == {
        "event": "check_pass_failed", "repeats_suppressed": 3}
    # Other events pass untouched, every time.
    assert all(f(None, "info", {"event": "run_finished"}) == {"event": "run_finished"}
               for _ in range(3))
