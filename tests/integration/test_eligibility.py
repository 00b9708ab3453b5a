"""`[agent] leader_eligible = false`: the node works but never leads, even when it is the only
one left; `cronsul status` shows it as not eligible."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cronsul_testing import REPO, Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul


@pytest.mark.slow
def test_an_ineligible_node_never_leads(tmp_path: Path, devconsul: DevConsul,
                                        redis_proc: RedisServer) -> None:
    redis_proc.client().flushdb()
    jobs = {"tick": {"schedule": "* * * * * *", "command": ["/bin/true"], "timeout": "10s"}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs)
    n1 = cluster.agents["n1"]
    n1.config.write_text(n1.config.read_text().replace(
        'node = "n1"', 'node = "n1"\nleader_eligible = false', 1))
    cluster.start()
    try:
        assert cluster.wait_leader(30) == "n2"
        status = subprocess.run(
            [sys.executable, "-m", "worker.cli", "status", "--json", "-c", str(n1.config)],
            capture_output=True, text=True, timeout=30, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        nodes = {n["node"]: n for n in json.loads(status.stdout)["nodes"]}
        assert nodes["n1"]["eligible"] is False and nodes["n2"]["eligible"] is True
        cluster.agents["n2"].signal(signal.SIGTERM)
        assert cluster.agents["n2"].wait(20) == 0
        time.sleep(5)  # far longer than a SIGTERM handover takes (tens of milliseconds)
        assert cluster.leader() is None, "the ineligible node took the lock"
        assert n1.alive()
        cluster.agents["n2"].start()
        wait_until(lambda: cluster.leader() == "n2", 30, what="n2 back as leader")
    finally:
        cluster.stop()
