"""The warm Python pool starts with the agent when a callable job runs on a queue the node
serves, so the first runs after a start do not wait for interpreters to boot; a node that
serves no callable job starts none."""

from __future__ import annotations

import contextlib
import io
import signal

from pathlib import Path

import redis

from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul
from worker.config import Config, load_config
from worker.keys import Keys
from worker.opcmds import enqueue
from worker.pyjobs import PROCESS_TAG

KEYS = Keys("cronsul")
NEVER = "@yearly"


def pool_children(agent_pid: int) -> list[int]:
    """Warm Python processes whose parent is the agent."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and PROCESS_TAG.encode() in cmdline.split(b"\0"):
            out.append(int(entry.name))
    return out


def enqueue_id(cfg: Config, job: str, params: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        enqueue(cfg, job, params, wait=False)
    return out.getvalue().strip()


def state(r: redis.Redis, run_id: str) -> str | None:
    value = r.hget(KEYS.run(run_id), "state")
    return value.decode() if value else None


def test_the_pool_is_warm_before_the_first_callable_run(tmp_path: Path, devconsul: DevConsul,
                                                        redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    jobs = {"py": {"schedule": NEVER, "timeout": "10s", "callable": "pyjobs_fixture:add",
                   "params": [{"a": "2", "b": "40"}]}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"python_workers": 2})
    cluster.start()
    try:
        agent = cluster.agents["n1"]
        # No run was enqueued: the processes exist because the agent started them.
        wait_until(lambda: len(pool_children(agent.pid)) == 2, 20,
                   what="two warm python processes started with the agent")
        warm = sorted(pool_children(agent.pid))
        assert r.xlen("cronsul:q:default") == 0
        cfg = load_config(agent.config)
        run_id = enqueue_id(cfg, "py", ["a=2", "b=40"])
        wait_until(lambda: state(r, run_id) == "succeeded", 20, what="the callable run")
        assert "42" in r.hget(KEYS.run(run_id), "output").decode()
        # The run used the warm processes; none was started for it.
        assert sorted(pool_children(agent.pid)) == warm
        # A reload (after a deploy of new job code) replaces them, so the next runs import
        # the code afresh; the pool keeps its size.
        agent.signal(signal.SIGHUP)
        wait_until(lambda: len(pool_children(agent.pid)) == 2
                   and not set(warm) & set(pool_children(agent.pid)), 20,
                   what="the warm processes replaced by the reload")
        again = enqueue_id(cfg, "py", ["a=1", "b=2"])
        wait_until(lambda: state(r, again) == "succeeded", 20, what="a run after the reload")
    finally:
        cluster.stop()


def test_a_node_serving_no_callable_job_starts_no_pool(tmp_path: Path, devconsul: DevConsul,
                                                       redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    marker = tmp_path / "ran"
    jobs = {
        # A callable on a queue this node does not serve: nothing to warm up for.
        "py-elsewhere": {"schedule": NEVER, "timeout": "10s", "queue": "batch",
                         "callable": "pyjobs_fixture:add", "params": [{"a": "1", "b": "1"}]},
        "sh": {"schedule": NEVER, "timeout": "10s",
               "command": ["/bin/sh", "-c", f"echo ok > {marker}"]},
    }
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs,
                      worker_extra={"python_workers": 2, "queues": ["default"]})
    cluster.start()
    try:
        agent = cluster.agents["n1"]
        cfg = load_config(agent.config)
        run_id = enqueue_id(cfg, "sh", [])
        # The fetch loop is serving (it warms the pool, if at all, before its first fetch).
        wait_until(lambda: state(r, run_id) == "succeeded", 20, what="the shell run")
        assert marker.read_text().strip() == "ok"
        assert pool_children(agent.pid) == []
    finally:
        cluster.stop()
