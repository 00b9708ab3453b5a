"""Messages anyone with queue access can send must never stop a node from running jobs. A
security review stopped every node with one 100-byte message: a lone surrogate in a parameter
value raised UnicodeEncodeError out of the message check, each delivery kept a run slot, and
after `concurrency` of them the node ran nothing while /healthz said ok."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import redis
from cronsul_testing import Cluster, RedisServer, wait_until

from devconsul.testing import DevConsul
from worker.cli import main
from worker.keys import Keys

KEYS = Keys("cronsul")


def test_hostile_unicode_is_dead_lettered_and_the_node_keeps_running_jobs(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    r: redis.Redis = redis_proc.client()
    r.flushdb()
    jobs = {"probe": {"schedule": "@yearly", "command": ["/bin/echo", "{param.tenant}"],
                      "params": [{"tenant": "acme"}], "timeout": "10s"},
            "after": {"schedule": "@yearly", "command": ["/bin/true"], "timeout": "10s"}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"concurrency": 2})
    cluster.start()
    try:
        cluster.wait_leader(30)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        poison = [  # more than the node's run slots
            b'{"v":1,"job":"probe","run_id":"probe@evt-%d","scheduled_at":"%s",'
            b'"params":{"tenant":"\\ud800"}}' % (i, now.encode()) for i in range(4)]
        poison.append(b'{"v":1,"job":"probe","run_id":"probe@\\udfff","scheduled_at":"%s",'
                      b'"params":{"tenant":"x"}}' % now.encode())
        poison.append(b'{"v":1,"job":"\\ud800","run_id":"x@1","scheduled_at":"%s"}'
                      % now.encode())
        # A job this node does not know, scheduled in a far future: dead-lettered, not handed
        # back every 5 s until 10 minutes after 9999-12-31.
        poison.append(b'{"v":1,"job":"nope","run_id":"nope@evt-9",'
                      b'"scheduled_at":"9999-12-31T00:00:00Z"}')
        for p in poison:
            r.xadd(KEYS.stream("default"), {"p": p})
        wait_until(lambda: r.xlen(KEYS.dead) >= 6, 20, what="the poison dead-lettered")
        config = str(cluster.agents["n1"].config)
        for _ in range(3):  # more runs than slots: every slot came back
            assert main(["run", "after", "--wait", "-c", config]) == 0
        reasons = sorted({f[b"reason"].decode() for _, f in r.xrange(KEYS.dead)})
        assert reasons == ["bad params", "malformed", "unknown job"], reasons
        assert r.zcard(KEYS.delayed) <= 1  # only the surrogate job's hand-back (10 min window)
        log = cluster.agents["n1"].log.read_text()
        assert "fetch_loop_error" not in log and "Traceback" not in log
    finally:
        cluster.stop()
