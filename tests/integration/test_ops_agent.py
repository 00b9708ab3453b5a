"""One real agent process under a fake systemd: a real AF_UNIX datagram socket as NOTIFY_SOCKET,
the Consul dev server, a real redis-server. Checks READY/STATUS/WATCHDOG/STOPPING, the drain
status on node maintenance, and /metrics and /healthz scraped over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cronsul_testing import AgentProcess, free_port, redis_server, render_config, wait_until
from devconsul.testing import DevConsul
from worker.cli import main


class NotifyListener:
    """What systemd would see: every datagram sent to NOTIFY_SOCKET, in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def seen(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for m in list(self.messages)
                if key in m and (value is None or m[key] == value)]

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in list(self.messages) if "STATUS" in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_agent_under_systemd_notify_metrics_and_health(
    tmp_path: Path, devconsul: DevConsul, notify: NotifyListener,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    with redis_server() as rs:
        consul_addr = devconsul.add_agent("n1")
        config = tmp_path / "n1.toml"
        config.write_text(render_config(
            {"agent": {"node": "n1", "address": "127.0.0.1"},
             "consul": {"address": consul_addr, "session_ttl": "10s", "check_ttl": "2s",
                        "lock_delay": "2s"},
             "redis": {"url": rs.url},
             "worker": {"visibility_timeout": "4s", "shutdown_grace": "3s", "kill_grace": "1s"},
             "http": {"listen": f"127.0.0.1:{port}"}},
            {"tick": {"schedule": "* * * * * *", "command": ["/bin/true"], "timeout": "5s"},
             # Runs 2.5 s every second: most of its ticks are skipped (overlap = skip).
             "slow": {"schedule": "* * * * * *", "command": ["/bin/sleep", "2.5"],
                      "overlap": "skip", "timeout": "5s"}},
        ))
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
        monkeypatch.setenv("WATCHDOG_USEC", "1500000")  # ping at least every 0.5 s
        agent = AgentProcess("n1", config, tmp_path / "n1.log").start()
        try:
            # READY=1 once registered and consuming, then STATUS=leader, then regular pings.
            ready = wait_until(lambda: notify.seen("READY", "1"), 20, what="READY=1")[0]
            assert ready["MAINPID"] == str(agent.pid)
            assert ready["STATUS"] in ("follower", "leader")
            wait_until(lambda: "leader" in notify.statuses(), 10, what="STATUS=leader")
            wait_until(lambda: len(notify.seen("WATCHDOG", "1")) >= 3, 5, what="WATCHDOG=1")

            # /healthz and /metrics over HTTP.
            code, body = healthz(port)
            assert (code, body["status"], body["role"]) == (200, "ok", "leader"), body
            wait_until(lambda: scrape(port).get(
                ("cronsul_runs_total", (("event", "succeeded"), ("job", "tick"))), 0) >= 2,
                10, what="two succeeded runs in /metrics")
            m = scrape(port)
            assert m[("cronsul_is_leader", ())] == 1
            assert 0 < m[("cronsul_lease_remaining_seconds", ())] <= 1.5
            assert m[("cronsul_leader_elections_total", ())] == 1
            assert m[("cronsul_ticks_total", (("outcome", "enqueued"),))] >= 2
            assert m[("cronsul_tick_lag_seconds_count", ())] >= 2
            assert m[("cronsul_run_duration_seconds_count", (("job", "tick"),))] >= 2
            assert ("cronsul_queue_depth", (("queue", "default"),)) in m
            assert ("cronsul_queue_oldest_age_seconds", (("queue", "default"),)) in m
            # The "has not succeeded for too long" alert's input: recent, for the job that
            # succeeds; absent for the one that has not finished a run yet.
            last_ok = m[("cronsul_job_last_success_timestamp_seconds", (("job", "tick"),))]
            assert 0 <= time.time() - last_ok < 10
            slow_ok = ("cronsul_job_last_success_timestamp_seconds", (("job", "slow"),))
            assert slow_ok not in m or 0 <= time.time() - m[slow_ok] < 10
            assert m[("cronsul_draining", ())] == 0
            # A skipped run is counted, and listed in its job's history like any ended run.
            wait_until(lambda: scrape(port).get(
                ("cronsul_runs_total", (("event", "skipped"), ("job", "slow"))), 0) >= 1,
                10, what="a skipped run in /metrics")
            capsys.readouterr()
            assert main(["history", "slow", "-c", str(config), "--json"]) == 0
            states = {r["state"] for r in json.loads(capsys.readouterr().out)["runs"]}
            assert "skipped" in states, states
            assert urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics").headers["Content-Type"].startswith(
                "text/plain")

            # A refused reload: the agent keeps its config, /healthz warns (still 200: it
            # runs), the metric says 0; the next good reload clears both. `check --quiet`
            # (what the unit's ExecReload runs first) fails on the same file.
            assert m[("cronsul_config_last_reload_successful", ())] == 1
            good_text = config.read_text()
            config.write_text(good_text + "\n[jobs.broken]\nschedule = 5\n")
            assert main(["check", "--quiet", "-c", str(config)]) == 2
            agent.signal(signal.SIGHUP)
            wait_until(lambda: scrape(port)[("cronsul_config_last_reload_successful", ())] == 0,
                       10, what="the refused reload in /metrics")
            code, body = healthz(port)
            assert code == 200 and body["status"] == "ok", body
            [warning] = body["warnings"]
            assert "config reload refused" in warning and "broken" in warning, warning
            config.write_text(good_text)
            capsys.readouterr()
            assert main(["check", "--quiet", "-c", str(config)]) == 0
            assert capsys.readouterr().out.count("\n") == 1  # one line, no fire times
            agent.signal(signal.SIGHUP)
            wait_until(lambda: scrape(port)[("cronsul_config_last_reload_successful", ())] == 1,
                       10, what="the good reload in /metrics")
            assert healthz(port)[1]["warnings"] == []
            m = scrape(port)
            assert m[("cronsul_config_reloads_total", (("result", "refused"),))] == 1
            assert m[("cronsul_config_reloads_total", (("result", "applied"),))] == 1

            # Node maintenance: STATUS=draining, the lock released, no longer leader.
            node_http = f"http://{consul_addr}"
            requests.put(f"{node_http}/v1/agent/maintenance",
                         params={"enable": "true", "reason": "patching"}, timeout=5)
            t0 = time.monotonic()
            wait_until(lambda: notify.statuses()[-1] == "draining", 5, what="STATUS=draining")
            assert time.monotonic() - t0 < 2.5
            code, body = healthz(port)
            assert (code, body["role"], body["draining"]) == (
                200, "draining", "node maintenance: patching"), body
            m = scrape(port)
            assert (m[("cronsul_draining", ())], m[("cronsul_is_leader", ())]) == (1, 0)
            assert m[("cronsul_leader_losses_total", ())] == 1

            # Maintenance off: leads again (alone in the cluster).
            requests.put(f"{node_http}/v1/agent/maintenance", params={"enable": "false"},
                         timeout=5)
            wait_until(lambda: notify.statuses()[-1] == "leader", 10, what="STATUS=leader again")

            # Redis down: /healthz says 503 and why; the agent keeps running (and pinging).
            rs.stop()
            code, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(healthz(port)),
                                    10, what="/healthz 503")
            assert any("Redis" in r for r in body["reasons"]), body
            pings = len(notify.seen("WATCHDOG"))
            wait_until(lambda: len(notify.seen("WATCHDOG")) > pings, 3,
                       what="watchdog pings while Redis is down")
            assert scrape(port)[("cronsul_redis_errors_total", (("kind", "connection"),))] >= 1

            agent.signal(signal.SIGTERM)
            assert agent.wait(40) == 0  # Redis down: the late-finish wait, on a loaded machine
            assert notify.seen("STOPPING", "1")
        finally:
            agent.stop()
            print(agent.log.read_text()[-4000:])
