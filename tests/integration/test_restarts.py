"""Infrastructure restarts under a running cluster: the Consul server restarting (keeping its
state, and losing it) and redis-server restarting (AOF on) while a job finishes."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from cronsul_testing import Cluster, RedisServer, redis_server, wait_until
from devconsul.testing import DevConsul


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.slow
def test_consul_restart_keeping_and_losing_state(tmp_path: Path, devconsul: DevConsul,
                                                 redis_proc: RedisServer) -> None:
    redis_proc.client().flushdb()
    out = tmp_path / "ticks.log"
    out.touch()
    jobs = {"tick": {"schedule": "* * * * * *", "timeout": "10s",
                     "command": ["/bin/sh", "-c", f'echo "$CRONSUL_SCHEDULED_AT" >> {out}']}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs)
    cluster.start()
    gaps: dict[str, float] = {}
    try:
        cluster.wait_leader(30)
        for keep in (True, False):
            devconsul.restart(keep_state=keep)
            restarted = time.monotonic()
            # Agents re-register (a lost state forgot their services and checks), abandon
            # sessions they could not be sure of, and elect a leader again.
            cluster.wait_leader(30)
            before = len(lines(out))
            wait_until(lambda b=before: len(lines(out)) > b + 2, 30, what="ticks again")
            gaps["keep" if keep else "lose"] = time.monotonic() - restarted
    finally:
        cluster.stop()
    print(f"seconds from restart to ticks running again: {gaps}")
    counts = Counter(lines(out))
    assert all(n == 1 for n in counts.values()), {t: n for t, n in counts.items() if n > 1}
    # Kept state: sessions survive; no leaderless stretch of 2 x session TTL (20 s) either way.
    assert gaps["keep"] < 15 and gaps["lose"] < 20, gaps


@pytest.mark.slow
def test_a_job_ending_while_redis_restarts_is_recorded_once(tmp_path: Path,
                                                            devconsul: DevConsul) -> None:
    out = tmp_path / "runs.log"
    out.touch()
    jobs = {"slow": {"schedule": "@yearly", "timeout": "30s", "command": [
        "/bin/sh", "-c", f'echo "start $CRONSUL_ATTEMPT" >> {out}; sleep 2; echo end >> {out}']}}
    with redis_server(appendonly=True) as rs:
        cluster = Cluster(tmp_path, devconsul, rs.url, ["n1", "n2"], jobs,
                          worker_extra={"visibility_timeout": "6s"})
        cluster.start()
        try:
            wait_until(lambda: all("agent_started" in a.log.read_text()
                                   for a in cluster.agents.values()), 30, what="agents")
            from worker.config import load_config
            from worker.opcmds import enqueue

            enqueue(load_config(cluster.agents["n1"].config), "slow", [], wait=False)
            wait_until(lambda: "start 1" in lines(out), 15, what="the run to start")
            time.sleep(1.0)
            rs.stop()  # the job ends (at ~2 s) while Redis is down
            time.sleep(2.0)
            rs.start()  # same port, AOF replayed
            wait_until(lambda: "end" in lines(out), 15, what="the job's end")
            time.sleep(8)  # longer than the visibility timeout: a re-run would show by now
        finally:
            cluster.stop()
        record = {k.decode(): v.decode() for k, v in
                  next(iter(_records(rs.client()))).items()}
    assert lines(out) == ["start 1", "end"], lines(out)
    assert record["state"] == "succeeded" and record["attempt"] == "1", record


def _records(r: object) -> list[dict[bytes, bytes]]:
    keys = r.keys("cronsul:run:slow@*")  # type: ignore[attr-defined]
    return [r.hgetall(k) for k in keys]  # type: ignore[attr-defined]
