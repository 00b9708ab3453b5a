"""A reload applies the jobs and the settings read per run, and keeps the ones the agent was
built with (node name, Consul, Redis, HTTP, queues, leases, warm pool) until a restart, naming
them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cronsul_testing import render_config

from worker.config import Config, load_config
from worker.reloading import settle_reload

BASE: dict[str, dict[str, Any]] = {
    "agent": {"node": "n3", "timezone": "UTC"},
    "consul": {"address": "127.0.0.1:8500", "check_ttl": "3s"},
    "redis": {"url": "redis://127.0.0.1:6379/0"},
    "worker": {"concurrency": 4, "queues": ["default"], "kill_grace": "2s",
               "visibility_timeout": "30s"},
    "http": {"listen": "127.0.0.1:9464"},
}
JOBS = {"j": {"schedule": "@daily", "command": ["/bin/true"]}}


def load(tmp_path: Path, name: str, sections: dict[str, dict[str, Any]],
         jobs: dict[str, dict[str, Any]] = JOBS) -> Config:
    path = tmp_path / f"{name}.toml"
    path.write_text(render_config(sections, jobs))
    return load_config(path)


def changed(section: str, **values: Any) -> dict[str, dict[str, Any]]:
    return {**BASE, section: {**BASE[section], **values}}


def test_node_local_settings_keep_their_running_values_and_are_named(tmp_path: Path) -> None:
    running = load(tmp_path, "a", BASE)
    sections = changed("agent", node="n3x")
    sections = {**sections, "consul": {**BASE["consul"], "check_ttl": "4s"},
                "http": {"listen": "127.0.0.1:9465"},
                "worker": {**BASE["worker"], "queues": ["default", "batch"],
                           "visibility_timeout": "60s"}}
    settled, needs_restart = settle_reload(running, load(tmp_path, "b", sections))
    assert needs_restart == ["[agent] node", "[consul]", "[http] listen",
                             "[worker] visibility_timeout", "[worker] queues"]
    assert settled.agent.node == "n3" and settled.consul == running.consul
    assert settled.http.listen == running.http.listen
    assert settled.worker.queues == ("default",)
    assert settled.worker.visibility_timeout == running.worker.visibility_timeout


def test_jobs_and_per_run_settings_apply(tmp_path: Path) -> None:
    sections = changed("worker", kill_grace="5s", concurrency=8)
    sections["worker"]["python_workers"] = 2  # explicit: the run slots alone change
    running = load(tmp_path, "a2", {**BASE, "worker": {**BASE["worker"], "python_workers": 2}})
    loaded = load(tmp_path, "b", sections,
                  {**JOBS, "k": {"schedule": "@hourly", "command": ["/bin/true"]}})
    settled, needs_restart = settle_reload(running, loaded)
    assert needs_restart == []
    assert settled.worker.kill_grace.total_seconds() == 5 and settled.worker.concurrency == 8
    assert sorted(settled.jobs) == ["j", "k"] and settled.config_hash == loaded.config_hash


def test_concurrency_sizing_the_warm_pool_is_named(tmp_path: Path) -> None:
    running = load(tmp_path, "a", BASE)  # python_workers 0: one warm process per run slot
    settled, needs_restart = settle_reload(running, load(tmp_path, "b",
                                                         changed("worker", concurrency=8)))
    assert settled.worker.concurrency == 8
    assert needs_restart == ["[worker] concurrency (for the warm pool's size; the run slots "
                             "apply)"]
