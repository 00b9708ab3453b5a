"""`cronsul status`: the text it prints."""

from __future__ import annotations

from worker.status import render


def test_status_recent_failures_say_how_each_run_ended() -> None:
    """A timed-out run showed as "exit=- " (empty); now: timed out, a signal, or the exit."""
    base = {"leader": None, "nodes": [], "queues": {}, "dead_letters": 0, "paused": {}}
    failures = [
        {"finished": "2026-11-23T08:00:00Z", "run_id": "slow@1", "state": "failed",
         "node": "n3", "exit_code": "", "error": "", "signal": "15", "timed_out": True},
        {"finished": "2026-11-23T08:00:01Z", "run_id": "oom@1", "state": "dead",
         "node": "n1", "exit_code": "", "error": "", "signal": "9", "timed_out": False},
        {"finished": "2026-11-23T08:00:02Z", "run_id": "bad@1", "state": "failed",
         "node": "n2", "exit_code": "3", "error": "", "signal": "", "timed_out": False},
    ]
    text = render({**base, "recent_failures": failures})
    assert "  2026-11-23T08:00:00Z  slow@1  failed on n3  timed out\n" in text + "\n"
    assert "oom@1  dead on n1  signal 9" in text and "bad@1  failed on n2  exit 3" in text
    assert "exit=-" not in text
