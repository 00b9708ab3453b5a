"""`cronsul stop RUN_ID`: an operator aborts a running run (Jenkins' abort button). The node
running it stops it as a timeout would, and it is recorded failed, with who and why, and not
retried."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from cronsul_testing import Cluster, RedisServer, wait_until

from devconsul.testing import DevConsul
from worker.cli import main
from worker.keys import Keys

KEYS = Keys("cronsul")


def test_an_operator_stops_a_running_run(tmp_path: Path, devconsul: DevConsul,
                                         redis_proc: RedisServer, redis_client: redis.Redis,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    redis_client.flushdb()
    marker = tmp_path / "cleaned"
    jobs = {"long": {"schedule": "@yearly", "timeout": "60s", "retries": 2, "shell": True,
                     "command": f"trap 'echo cleaned > {marker}; exit 143' TERM; "
                                "sleep 60 & wait"}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"visibility_timeout": "3s", "kill_grace": "5s"})
    cluster.start()
    try:
        cluster.wait_leader(30)
        config = str(cluster.agents["n1"].config)
        capsys.readouterr()
        assert main(["run", "long", "-c", config]) == 0
        run_id = capsys.readouterr().out.strip()
        wait_until(lambda: redis_client.hget(KEYS.run(run_id), "state") == b"running", 20,
                   what="the run running")
        began = time.monotonic()
        assert main(["stop", run_id, "--reason", "wrong tenant", "-c", config]) == 0
        assert "asked the node running" in capsys.readouterr().out
        wait_until(lambda: redis_client.hget(KEYS.run(run_id), "state") == b"failed", 15,
                   what="the run stopped and recorded")
        assert time.monotonic() - began < 8  # a renewal (1 s) and the TERM, not the timeout
        record = {k.decode(): v.decode() for k, v in
                  redis_client.hgetall(KEYS.run(run_id)).items()}
        assert record["error"].startswith("stopped by an operator (cronsul stop): ")
        assert record["error"].endswith(": wrong tenant"), record["error"]
        assert marker.read_text() == "cleaned\n"  # TERM first: it could clean up
        time.sleep(1.5)
        assert redis_client.hget(KEYS.run(run_id), "attempt") == b"1"  # not retried
        assert redis_client.zcard(KEYS.delayed) == 0
        # A run that is not running is not "stopped".
        assert main(["stop", run_id, "-c", config]) == 1
        assert "is failed, not running: nothing to stop" in capsys.readouterr().out
        assert main(["stop", "long@nope", "-c", config]) == 2
    finally:
        cluster.stop()
