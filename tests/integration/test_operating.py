"""Operating schedules on a real two-agent cluster: pause/resume through Consul, fan-out with
parameters, SIGHUP reload (good and bad files), `cronsul run --wait`, and catch-up after the
whole cluster was stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cronsul_testing import REPO, Cluster, RedisServer, render_config, wait_until
from devconsul.testing import DevConsul


def stamps(path: Path, column: int = 0) -> Counter[datetime]:
    out: Counter[datetime] = Counter()
    for line in path.read_text().splitlines():
        out[datetime.fromisoformat(line.split()[column].replace("Z", "+00:00"))] += 1
    return out


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env={**os.environ,
                                                                "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_pause_fanout_reload_manual_run_and_catchup(
    tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer
) -> None:
    redis_proc.client().flushdb()
    tick, fan, late = tmp_path / "tick.log", tmp_path / "fan.log", tmp_path / "late.log"
    for f in (tick, fan, late):
        f.touch()
    jobs = {
        "tick": {"schedule": "* * * * * *", "timeout": "10s",
                 "command": ["/bin/sh", "-c", f'echo "$CRONSUL_SCHEDULED_AT" >> {tick}']},
        "fan": {"schedule": "*/2 * * * * *", "timeout": "10s",
                "command": ["/bin/sh", "-c",
                            f'echo "$CRONSUL_SCHEDULED_AT $1 $CRONSUL_PARAM_APP" >> {fan}',
                            "sh", "{param.app}"],
                "params": [{"app": "a"}, {"app": "b"}, {"app": "c"}]},
    }
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs)
    cfg = str(cluster.agents["n1"].config)
    cluster.start()
    try:
        cluster.wait_leader(30)
        wait_until(lambda: len(tick.read_text().splitlines()) >= 3, 20, what="first ticks")

        # -- pause / resume through Consul ------------------------------------------------
        assert cli("pause", "tick", "-c", cfg, "--reason", "maintenance window").returncode == 0
        paused_at = datetime.now(UTC)
        time.sleep(4)
        done = cli("resume", "tick", "-c", cfg)
        resumed_at = datetime.now(UTC)
        assert done.returncode == 0 and "resumed tick" in done.stdout, done
        again = cli("resume", "tick", "-c", cfg)  # says so, rather than "resumed" again
        assert again.returncode == 0 and "tick was not paused" in again.stdout, again
        wait_until(lambda: max(stamps(tick)) > resumed_at, 10, what="ticks after resume")
        during = [t for t in stamps(tick) if paused_at + timedelta(seconds=1.5) < t
                  < resumed_at - timedelta(seconds=0.5)]
        assert during == [], f"ticks ran while paused: {during}"

        # -- reload: a new job appears without a restart; a bad file changes nothing ------
        good = dict(jobs, late={"schedule": "* * * * * *", "timeout": "10s",
                                "command": ["/bin/sh", "-c", f"date +%s >> {late}"]})
        for agent in cluster.agents.values():
            text = agent.config.read_text()
            head = text.split("[jobs.")[0]
            agent.config.write_text(head + render_config({}, good))
            agent.signal(signal.SIGHUP)
        wait_until(lambda: len(late.read_text().splitlines()) >= 2, 15, what="reloaded job")
        good_text = {n: a.config.read_text() for n, a in cluster.agents.items()}
        for agent in cluster.agents.values():
            agent.config.write_text(agent.config.read_text() + "\n[jobs.broken]\nschedule = 5\n")
            agent.signal(signal.SIGHUP)
        wait_until(lambda: all("reload_refused" in a.log.read_text()
                               for a in cluster.agents.values()), 10, what="refused reloads")
        before = len(late.read_text().splitlines())
        wait_until(lambda: len(late.read_text().splitlines()) > before + 1, 10,
                   what="old schedules still running after a bad reload")
        for name, agent in cluster.agents.items():
            agent.config.write_text(good_text[name])

        # -- a manual run, followed to the end --------------------------------------------
        done = cli("run", "tick", "-c", cfg, "--wait")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "succeeded" in done.stdout and "tick@manual-" in done.stdout
        bad = cli("run", "tick", "-c", cfg, "--param", "app=x")
        assert bad.returncode == 2 and "no such parameter" in bad.stderr

        # -- status: leader, nodes, queues, paused jobs, from Consul and Redis ------------
        assert cli("pause", "fan", "-c", cfg, "--reason", "db upgrade").returncode == 0
        again = cli("pause", "fan", "-c", cfg)  # no reason: the one given stays
        assert again.returncode == 0 and "fan is already paused: db upgrade" in again.stdout
        status = cli("status", "-c", cfg, "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["leader"]["node"] in {"n1", "n2"}
        assert sorted(n["node"] for n in report["nodes"]) == ["n1", "n2"]
        assert all(n["healthy"] and n["eligible"] and not n["draining"] for n in report["nodes"])
        assert "default" in report["queues"] and report["dead_letters"] == 0
        assert report["paused"]["fan"]["reason"] == "db upgrade"  # an object, not JSON text
        text = cli("status", "-c", cfg).stdout
        assert "leader: " in text and "paused jobs: fan (db upgrade)" in text
        assert cli("resume", "fan", "-c", cfg).returncode == 0

        # -- the whole cluster stops, then comes back: catch-up ---------------------------
        for agent in cluster.agents.values():
            agent.signal(signal.SIGTERM)
        for agent in cluster.agents.values():
            assert agent.wait(20) == 0
        down_from = datetime.now(UTC)
        # Stopped nodes leave the catalog; status still lists them, as not running.
        down = json.loads(cli("status", "-c", cfg, "--json").stdout)
        assert down["nodes"] == [], down["nodes"]
        assert sorted((n["node"], n["stopped_cleanly"]) for n in down["absent_nodes"]) == [
            ("n1", True), ("n2", True)], down["absent_nodes"]
        assert cli("status", "-c", cfg).stdout.count("NOT RUNNING: stopped at") == 2
        time.sleep(max(0.0, 6 - (datetime.now(UTC) - down_from).total_seconds()))
        down_to = datetime.now(UTC)
        cluster.start()
        wait_until(lambda: max(stamps(tick)) > down_to + timedelta(seconds=2), 30,
                   what="ticks after restart")
    finally:
        cluster.stop()

    ticks = stamps(tick)
    assert all(n == 1 for n in ticks.values()), {t: n for t, n in ticks.items() if n > 1}
    outage = [down_from + timedelta(seconds=i) for i in range(1, 6)]
    caught_up = [t.replace(microsecond=0) for t in outage]
    assert all(t in ticks for t in caught_up), "ticks missed while the cluster was down"

    fan_lines = [line.split() for line in fan.read_text().splitlines()]
    per_tick: dict[str, list[str]] = {}
    for when, argv_app, env_app in fan_lines:
        assert argv_app == env_app  # {param.app} as argv and CRONSUL_PARAM_APP agree
        per_tick.setdefault(when, []).append(env_app)
    assert per_tick and all(sorted(apps) == ["a", "b", "c"] for apps in per_tick.values())
