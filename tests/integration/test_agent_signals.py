"""`kill -USR1` makes a running agent write every thread's stack to its log (faulthandler, from
C: it works even when the agent is stuck) and changes nothing else; SIGTERM still stops it."""

from __future__ import annotations

import signal
from pathlib import Path

from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul


def test_sigusr1_dumps_every_threads_stack_and_the_agent_serves_on(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    jobs = {"idle": {"schedule": "@yearly", "timeout": "5s", "command": ["/bin/true"],
                     "allow_root": True}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs)
    cluster.start()
    agent = cluster.agents["n1"]
    try:
        wait_until(lambda: '"agent_ready"' in agent.log.read_text(), 20, what="the agent")
        agent.signal(signal.SIGUSR1)
        wait_until(lambda: "Current thread" in agent.log.read_text()
                   or "Thread 0x" in agent.log.read_text(), 10, what="the stack dump")
        dump = agent.log.read_text()
        assert dump.count("Thread 0x") >= 5  # main, consumer, reactor, finisher, elector...
        assert "worker/agent.py" in dump and "worker/consumer.py" in dump
        assert agent.alive()
        agent.signal(signal.SIGTERM)
        assert agent.wait(20) == 0
        assert '"agent_stopped"' in agent.log.read_text()
    finally:
        cluster.stop()
