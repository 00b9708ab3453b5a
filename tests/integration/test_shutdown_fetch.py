"""A fetch that returns while the agent is shutting down: its runs are this node's, so they
run within the shutdown grace and are recorded. A review found them claimed after the reactor
had stopped (a plain SIGTERM about 30 ms before a per-second tick, 5 restarts in 12): never
started, never recorded, taken over a visibility timeout later (run twice when the first copy
had started)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from cronsul_testing import LoneConsumer, RedisServer
from worker.keys import Keys
from worker.sink import run_payload

KEYS = Keys("cronsul")


def test_runs_fetched_as_the_drain_begins_are_run_and_recorded(
        tmp_path: Path, redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    marker = tmp_path / "ran"
    node = LoneConsumer(tmp_path, redis_proc.url, {
        "mark": {"schedule": "@yearly", "timeout": "5s",
                 "command": ["/bin/sh", "-c", f"sleep 0.2; echo ran >> {marker}"]}})
    consumer = node.consumer
    stop = threading.Event()
    loop = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    loop.start()
    try:
        time.sleep(0.3)  # the fetch loop is now blocked in XREADGROUP
        drained: list[bool] = []
        drainer = threading.Thread(target=lambda: drained.append(consumer.drain(10, 1)))
        drainer.start()
        time.sleep(0.1)
        # The drain waits for the fetch under way instead of finding nothing in flight.
        assert drainer.is_alive()
        r.xadd(KEYS.stream("default"), {"p": run_payload("mark@1", "mark", datetime.now(UTC),
                                                         {})})
        drainer.join(15)
        assert drained == [True]
        assert marker.read_text() == "ran\n"
        assert r.hget(KEYS.run("mark@1"), "state") == b"succeeded"
        stop.set()
        node.close()
        # Nothing is left pending for another node to take over (and run again).
        assert r.xpending(KEYS.stream("default"), "cronsul")["pending"] == 0
        # And a run enqueued once the drain is over is left for other nodes.
        r.xadd(KEYS.stream("default"), {"p": run_payload("mark@2", "mark", datetime.now(UTC),
                                                         {})})
        time.sleep(1.5)  # longer than one blocking fetch
        assert r.xpending(KEYS.stream("default"), "cronsul")["pending"] == 0  # not delivered
        assert marker.read_text() == "ran\n"
    finally:
        stop.set()
        loop.join(5)
        node.watchdog.stop()
