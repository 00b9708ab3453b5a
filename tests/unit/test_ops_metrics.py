"""Metrics hooks feed per-agent registries; Consul request failures are counted by kind."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from cronsul_testing import free_port
from prometheus_client import generate_latest

from scheduler.ticker import TickReport
from worker.config import ConsulSection
from worker.consulapi import make_clients
from worker.metrics import AgentMetrics, RunHooks


def value(m: AgentMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    got = m.registry.get_sample_value(name, labels or {})
    return 0.0 if got is None else got


def test_tick_reports_add_up() -> None:
    m = AgentMetrics()
    m.tick_report(TickReport(enqueued=3, deduplicated=1, missed=2, skipped_paused=0,
                             lags=[0.01, 0.2, 3.0]))
    m.tick_report(TickReport(enqueued=1, lags=[0.02]))
    assert value(m, "cronsul_ticks_total", {"outcome": "enqueued"}) == 4
    assert value(m, "cronsul_ticks_total", {"outcome": "deduplicated"}) == 1
    assert value(m, "cronsul_ticks_total", {"outcome": "missed"}) == 2
    assert value(m, "cronsul_ticks_total", {"outcome": "skipped_paused"}) == 0
    assert value(m, "cronsul_tick_lag_seconds_count") == 4
    assert value(m, "cronsul_tick_lag_seconds_bucket", {"le": "0.25"}) == 3


def test_runs_by_job_and_event() -> None:
    m = AgentMetrics()
    m.run_started("a")
    m.run_finished("a", "succeeded", 1.5)
    m.run_started("a")
    m.run_finished("a", "failed", 0.2)
    m.run_dead_lettered("unknown job")
    assert value(m, "cronsul_runs_total", {"job": "a", "event": "started"}) == 2
    assert value(m, "cronsul_runs_total", {"job": "a", "event": "failed"}) == 1
    assert value(m, "cronsul_run_duration_seconds_sum", {"job": "a"}) == pytest.approx(1.7)
    assert value(m, "cronsul_runs_dead_lettered_total", {"reason": "unknown job"}) == 1


def test_leadership_terms() -> None:
    m = AgentMetrics()
    m.leadership(True)
    m.leadership(False)
    m.leadership(True)
    assert value(m, "cronsul_leader_elections_total") == 2
    assert value(m, "cronsul_leader_losses_total") == 1


def test_two_agents_in_one_process_do_not_share_metrics() -> None:
    a, b = AgentMetrics(), AgentMetrics()
    a.run_started("x")
    assert value(b, "cronsul_runs_total", {"job": "x", "event": "started"}) == 0
    assert b"cronsul_is_leader" not in generate_latest(b.registry)  # not attached: no gauges


def test_the_no_op_hooks_accept_everything() -> None:
    RunHooks().run_finished("a", "lost", 1.0)


def test_consul_failures_are_counted_by_kind() -> None:
    m = AgentMetrics()
    cfg = ConsulSection("http", "127.0.0.1", free_port(), None, "cronsul",
                        timedelta(seconds=15), timedelta(seconds=5), timedelta(seconds=5))
    client = make_clients(cfg, 1.0, m.consul_error).call
    with pytest.raises(requests.ConnectionError):
        client.kv.get("cronsul/leader")
    assert value(m, "cronsul_consul_errors_total", {"kind": "unreachable"}) == 1
