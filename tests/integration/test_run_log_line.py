"""Every run ends with one canonical `run_finished` line: at info when it succeeded or was
skipped, warning when it failed (journalctl -p warning shows it), error when it is dead; a run
that failed without an error text says how it ended (exit code, signal, timeout); a run ended
without starting (overlap = skip) gets the same line."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from cronsul_testing import LoneConsumer, RedisServer, wait_until
from worker.keys import Keys
from worker.sink import run_payload

KEYS = Keys("cronsul")


def test_run_finished_levels_and_errors(tmp_path: Path, redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    node = LoneConsumer(tmp_path, redis_proc.url, {
        "ok": {"schedule": "@yearly", "timeout": "5s", "command": ["/bin/true"]},
         "exits": {"schedule": "@yearly", "timeout": "5s", "command": ["/bin/sh", "-c", "exit 3"]},
         "hangs": {"schedule": "@yearly", "timeout": "1s", "command": ["/bin/sleep", "30"]},
         "dies": {"schedule": "@yearly", "timeout": "5s", "command": ["/bin/false"],
                  "retries": 1, "retry_backoff": "1s", "retry_backoff_max": "1s"},
         "long": {"schedule": "@yearly", "timeout": "5s", "command": ["/bin/sleep", "1"],
                  "overlap": "skip"}}, {"concurrency": 8, "kill_grace": "1s"})
    consumer = node.consumer
    stop = threading.Event()
    loop = threading.Thread(target=consumer.run, args=(stop,), daemon=True)

    def enqueue(run_id: str) -> None:
        job = run_id.split("@")[0]
        r.xadd(KEYS.stream("default"), {"p": run_payload(run_id, job, datetime.now(UTC), {})})

    def finished(logs: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
        return [e for e in logs if e["event"] == "run_finished" and e["run_id"] == run_id]

    try:
        with capture_logs() as logs:
            loop.start()
            for run_id in ("ok@1", "exits@1", "hangs@1", "dies@1", "long@1"):
                enqueue(run_id)
            wait_until(lambda: r.hget(KEYS.run("long@1"), "state") == b"running", 10,
                       what="long@1 running")
            enqueue("long@2")  # finds long@1 holding the lock: skipped
            wait_until(lambda: all(r.hget(KEYS.run(i), "state") in (
                b"succeeded", b"failed", b"dead", b"skipped")
                for i in ("ok@1", "exits@1", "hangs@1", "dies@1", "long@1", "long@2")), 20,
                what="every run ended")
            wait_until(lambda: len(finished(logs, "dies@1")) == 2, 10, what="both lines")
        by_id = {i: finished(logs, i) for i in ("ok@1", "exits@1", "hangs@1", "long@2")}
        assert all(len(v) == 1 for v in by_id.values()), by_id
        ok, exits, hangs, skipped = (by_id[i][0] for i in ("ok@1", "exits@1", "hangs@1",
                                                               "long@2"))
        assert (ok["log_level"], ok["state"], ok["error"]) == ("info", "succeeded", None)
        assert (exits["log_level"], exits["state"], exits["error"]) == (
            "warning", "failed", "exit code 3")
        assert (hangs["log_level"], hangs["state"], hangs["timed_out"]) == (
            "warning", "failed", True)
        assert hangs["error"] == "timed out (killed by signal 15)", hangs
        retrying, dead = finished(logs, "dies@1")
        assert (retrying["log_level"], retrying["state"]) == ("warning", "retrying")
        assert (dead["log_level"], dead["state"], dead["error"]) == ("error", "dead",
                                                                     "exit code 1")
        assert (skipped["log_level"], skipped["state"], skipped["attempt"]) == (
            "info", "skipped", None)
        assert skipped["error"].startswith("skipped"), skipped
    finally:
        stop.set()
        loop.join(5)
        node.close()
