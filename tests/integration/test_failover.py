"""Three real agents, one job every second, the leader killed three ways.

Asserts the two promises end to end: every scheduled second runs exactly once (read from what
the job itself wrote), and a new leader holds the key within check_ttl + lock_delay + 2 s after
a crash, within 2 s after a SIGTERM; the SIGSTOPped zombie enqueues nothing after it wakes.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul

CHECK_TTL_S, LOCK_DELAY_S, SESSION_TTL_S = 2.0, 2.0, 10.0


def seconds_written(out: Path) -> Counter[datetime]:
    counts: Counter[datetime] = Counter()
    for line in out.read_text().splitlines():
        stamp, _node = line.split()
        counts[datetime.fromisoformat(stamp.replace("Z", "+00:00"))] += 1
    return counts


@pytest.mark.slow
def test_failover_keeps_every_second_exactly_once(
    tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer
) -> None:
    redis_proc.client().flushdb()
    out = tmp_path / "ticks.log"
    out.touch()
    jobs = {"tick": {
        "schedule": "* * * * * *",
        "command": ["/bin/sh", "-c", f'echo "$CRONSUL_SCHEDULED_AT $CRONSUL_NODE" >> {out}'],
        "timeout": "10s",
    }}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2", "n3"], jobs)
    cluster.start()
    failovers: dict[str, float] = {}
    try:
        leader = cluster.wait_leader(30)
        wait_until(lambda: len(out.read_text().splitlines()) >= 3, 20, what="first runs")

        # 1. kill -9: the session dies with the check (check_ttl), then lock-delay.
        killed_at = time.monotonic()
        cluster.agents[leader].signal(signal.SIGKILL)
        leader = cluster.wait_leader(CHECK_TTL_S + LOCK_DELAY_S + 10, exclude=leader)
        failovers["sigkill"] = time.monotonic() - killed_at
        for a in cluster.agents.values():
            if not a.alive():
                a.start()  # systemd's Restart=on-failure
        time.sleep(3)

        # 2. SIGTERM: release, then destroy: no lock-delay for the successor.
        termed_at = time.monotonic()
        cluster.agents[leader].signal(signal.SIGTERM)
        old = leader
        leader = cluster.wait_leader(10, exclude=old)
        failovers["sigterm"] = time.monotonic() - termed_at
        assert cluster.agents[old].wait(20) == 0
        cluster.agents[old].start()
        time.sleep(3)

        # 3. SIGSTOP past the session TTL, then SIGCONT: a zombie that must write nothing.
        zombie = cluster.agents[leader]
        zombie.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        leader = cluster.wait_leader(CHECK_TTL_S + LOCK_DELAY_S + 10, exclude=zombie.node)
        failovers["sigstop"] = time.monotonic() - stopped_at
        time.sleep(max(0.0, SESSION_TTL_S + 2 - (time.monotonic() - stopped_at)))
        zombie.signal(signal.SIGCONT)
        time.sleep(5)
        assert cluster.leader() == leader, "the thawed zombie must not take the lock back"
    finally:
        cluster.stop()
    print(f"failover seconds: {failovers}")
    assert failovers["sigkill"] <= CHECK_TTL_S + LOCK_DELAY_S + 2, failovers
    assert failovers["sigstop"] <= CHECK_TTL_S + LOCK_DELAY_S + 2, failovers
    assert failovers["sigterm"] <= 2, failovers

    counts = seconds_written(out)
    doubled = {t: n for t, n in counts.items() if n > 1}
    assert not doubled, f"seconds run more than once: {doubled}\n{cluster.logs()}"
    first, last = min(counts), max(counts)
    expected = {first + timedelta(seconds=i) for i in range(int((last - first).total_seconds()) + 1)}
    missing = sorted(expected - set(counts))
    assert not missing, f"seconds never run: {missing}\n{cluster.logs()}"
    assert len(counts) >= 20  # the scenario spans about 30 s; a slow start costs a few
