"""`kill -USR1` makes a running agent write every thread's stack to its log (faulthandler, from
C: it works even when the agent is stuck) and changes nothing else; SIGTERM still stops it."""

from __future__ import annotations

import signal
from pathlib import Path

from cronsul_testing import REPO, Cluster, RedisServer, wait_until
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
        # main, consumer, reactor, finisher, elector...: read once all are written (the dump
        # is written by another thread of the agent while this one reads the log).
        wait_until(lambda: agent.log.read_text().count("Thread 0x") >= 5, 10,
                   what="every thread's stack in the dump")
        dump = agent.log.read_text()
        assert "worker/agent.py" in dump and "worker/consumer.py" in dump
        assert agent.alive()
        agent.signal(signal.SIGTERM)
        assert agent.wait(20) == 0
        assert '"agent_stopped"' in agent.log.read_text()
    finally:
        cluster.stop()


GRACEFUL = REPO / "tests" / "graceful_job.py"  # cleans up on SIGTERM, then writes its marker


def test_sigterm_gives_a_run_still_going_term_and_the_kill_grace_and_leaves_consul(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    """A run still going when shutdown_grace ends gets TERM, then KILL after kill_grace (as a
    timeout does: it may clean up), is not recorded (its lease lapses and another node takes
    it over), and the agent's service does not come back in Consul while the runs drain."""
    import sys

    import requests

    from worker.cli import main

    script = GRACEFUL
    marker = tmp_path / "marker"
    jobs = {"long": {"schedule": "@yearly", "timeout": "1h", "allow_root": True,
                     "command": [sys.executable, str(script), str(marker)]}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"shutdown_grace": "1s", "kill_grace": "3s"})
    cluster.start()
    agent = cluster.agents["n1"]
    try:
        wait_until(lambda: '"agent_ready"' in agent.log.read_text(), 20, what="the agent")
        assert main(["run", "long", "-c", str(agent.config)]) == 0
        wait_until(lambda: '"ready"' in agent.log.read_text(), 20, what="the job running")
        agent.signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        cluster.stop()
    log = agent.log.read_text()
    assert marker.read_text() == "cleaned up", log[-3000:]  # it got TERM and its grace
    assert '"run_stopped_at_shutdown"' in log and '"service_deregistered"' in log
    assert log.count('"service_registered"') == 1, log[-3000:]  # not again while draining
    services = requests.get(f"http://{devconsul.agent_address('n1')}/v1/agent/services",
                            timeout=5).json()
    assert "cronsul-n1" not in services, services
    [run_key] = redis_proc.client().keys("cronsul:run:long@*")
    assert redis_proc.client().hget(run_key, "state") == b"running"  # not recorded: taken over
