"""Two real agents: Consul maintenance drains a node; `cronsul drain` / `undrain` do the same.

* node maintenance on the leader's Consul agent: another node leads within 2 s (plus a margin
  for the test's own polling), the drained node starts no new runs, and the run it had in
  progress finishes;
* maintenance off: the node takes runs again and is eligible again, which `cronsul drain` of
  the other node (service maintenance through the CLI) proves by handing leadership back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cronsul_testing import REPO, Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul

STEP_DOWN_S = 2.0
# How long after a drain begins a run may still start on the drained node: the maintenance
# poll (1 s) plus one XREADGROUP that was already blocking when it was noticed (1 s).
LATE_START_S = 2.5


def starts(out: Path) -> list[tuple[str, float]]:
    """(node, wall time) of every run start the job wrote."""
    rows = []
    for line in out.read_text().splitlines():
        kind, node, when = line.split()[:3]
        if kind == "start":
            rows.append((node, float(when)))
    return rows


def unfinished(out: Path) -> set[str]:
    begun, ended = set(), set()
    for line in out.read_text().splitlines():
        kind, _node, _when, run = line.split()
        (begun if kind == "start" else ended).add(run)
    return begun - ended


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "worker.cli", *args, "-c", str(config)],
                          capture_output=True, text=True, env=env, cwd=str(REPO), timeout=30)


@pytest.mark.slow
def test_maintenance_drains_and_undrains(
    tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer
) -> None:
    redis_proc.client().flushdb()
    out = tmp_path / "runs.log"
    out.touch()
    script = (f'echo "start $CRONSUL_NODE $(date +%s.%N) $CRONSUL_RUN_ID" >> {out}; sleep 1.5; '
              f'echo "end $CRONSUL_NODE $(date +%s.%N) $CRONSUL_RUN_ID" >> {out}')
    jobs = {"work": {"schedule": "* * * * * *", "command": ["/bin/sh", "-c", script],
                     "timeout": "10s"}}
    # One slot per node and runs longer than the tick period: both nodes must work, and a
    # backlog builds while one is drained (so the undrained node provably takes runs again).
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1", "n2"], jobs,
                      worker_extra={"concurrency": 1})
    cluster.start()
    try:
        leader = cluster.wait_leader(30)
        other = "n2" if leader == "n1" else "n1"
        wait_until(lambda: {n for n, _ in starts(out)} == {"n1", "n2"}, 20,
                   what="both nodes running jobs")  # one slot each: neither can take them all

        # 1. Node maintenance on the leader's Consul agent.
        leader_consul = f"http://127.0.0.1:{devconsul.agents[leader]}"
        enabled_at = time.time()
        t0 = time.monotonic()
        requests.put(f"{leader_consul}/v1/agent/maintenance",
                     params={"enable": "true", "reason": "test"}, timeout=5).raise_for_status()
        assert cluster.wait_leader(STEP_DOWN_S + 1.0, exclude=leader) == other
        step_down = time.monotonic() - t0
        time.sleep(4)  # several ticks: all must go to the other node
        late = [t - enabled_at for n, t in starts(out) if n == leader and t > enabled_at]
        assert all(d < LATE_START_S for d in late), f"drained node started runs late: {late}"
        assert cluster.leader() == other
        wait_until(lambda: not unfinished(out) or all(
            n == other for n, t in starts(out) if t > enabled_at + LATE_START_S + 2), 5,
            what="drained node's runs finished")
        drained_runs = {line.split()[3] for line in out.read_text().splitlines()
                        if line.split()[1] == leader}
        assert not (drained_runs & unfinished(out)), "a run on the drained node never finished"
        assert '"event":"draining"' in cluster.agents[leader].log.read_text()

        # 2. Maintenance off: the node takes runs again.
        back_at = time.time()
        requests.put(f"{leader_consul}/v1/agent/maintenance", params={"enable": "false"},
                     timeout=5).raise_for_status()
        wait_until(lambda: any(n == leader and t > back_at for n, t in starts(out)), 10,
                   what="undrained node running jobs again")

        # 3. `cronsul drain` of the current leader (service maintenance through the CLI): the
        #    undrained node is eligible again and takes over; `undrain` clears it.
        other_cfg = cluster.agents[other].config
        result = cli(other_cfg, "drain")
        assert result.returncode == 0, result.stderr
        t1 = time.monotonic()
        assert cluster.wait_leader(STEP_DOWN_S + 1.0, exclude=other) == leader
        cli_step_down = time.monotonic() - t1
        checks = requests.get(f"http://127.0.0.1:{devconsul.agents[other]}/v1/agent/checks",
                              timeout=5).json()
        assert f"_service_maintenance:cronsul-{other}" in checks
        # `cronsul status`: draining is deliberate, not a fault: healthy, not eligible, and why.
        status = cli(other_cfg, "status", "--json")
        assert status.returncode == 0, status.stderr
        [view] = [n for n in json.loads(status.stdout)["nodes"] if n["node"] == other]
        assert (view["healthy"], view["draining"], view["eligible"]) == (True, True, False), view
        assert view["maintenance"].startswith("service maintenance: cronsul drain by "), view
        line = next(t for t in cli(other_cfg, "status").stdout.splitlines()
                    if t.strip().startswith(other + " "))
        assert "UNHEALTHY" not in line and "draining (service maintenance" in line, line
        assert cli(other_cfg, "undrain").returncode == 0
        checks = requests.get(f"http://127.0.0.1:{devconsul.agents[other]}/v1/agent/checks",
                              timeout=5).json()
        assert f"_service_maintenance:cronsul-{other}" not in checks
    finally:
        cluster.stop()
    print(f"step-down seconds: node maintenance {step_down:.2f}, cronsul drain "
          f"{cli_step_down:.2f}")
    assert step_down <= STEP_DOWN_S + 0.5, step_down


def test_drain_names_the_missing_service(tmp_path: Path, devconsul: DevConsul) -> None:
    """`cronsul drain` on a host whose agent is not running says so and exits 1."""
    address = devconsul.add_agent("lonely")
    config = tmp_path / "c.toml"
    config.write_text(f'[agent]\nnode = "lonely"\n[consul]\naddress = "{address}"\n')
    result = cli(config, "drain")
    assert result.returncode == 1
    assert "cronsul-lonely is not registered" in result.stderr
