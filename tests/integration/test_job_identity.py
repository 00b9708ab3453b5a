"""A command job's user is looked up on the fetch thread, not the reactor (a lookup may wait on
a directory service while every run of the node waits on the reactor); an unknown user fails
the run with the lookup's error and the node goes on serving."""

from __future__ import annotations

import contextlib
import functools
import io
import pwd
from pathlib import Path

import pytest
import redis

from cronsul_testing import Cluster, RedisServer, wait_until
from devconsul.testing import DevConsul
from worker.config import Config, load_config
from worker.executor import Execution
from worker.keys import Keys
from worker.opcmds import enqueue

KEYS = Keys("cronsul")


def enqueue_id(cfg: Config, job: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        enqueue(cfg, job, [], wait=False)
    return out.getvalue().strip()


def record(r: redis.Redis, run_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(KEYS.run(run_id)).items()}


def test_an_unknown_user_fails_the_run_and_the_node_serves_on(
        tmp_path: Path, devconsul: DevConsul, redis_proc: RedisServer) -> None:
    r = redis_proc.client()
    r.flushdb()
    jobs = {"ghost": {"schedule": "@yearly", "timeout": "5s", "user": "cronsul-no-such-user",
                      "command": ["/bin/true"]},
            "plain": {"schedule": "@yearly", "timeout": "5s", "allow_root": True,
                      "command": ["/bin/sh", "-c", "echo served"]},
            # As cron: HOME, USER, LOGNAME, SHELL are the job user's, not the agent's; the
            # job's own env still wins.
            "asnobody": {"schedule": "@yearly", "timeout": "5s", "user": "nobody",
                         "env": {"LANG": "C"},
                         "command": ["/bin/sh", "-c", 'echo "$HOME $USER $LOGNAME $SHELL"']}}
    cluster = Cluster(tmp_path, devconsul, redis_proc.url, ["n1"], jobs)
    cluster.start()
    try:
        cfg = load_config(cluster.agents["n1"].config)
        ghost = enqueue_id(cfg, "ghost")
        wait_until(lambda: record(r, ghost).get("state") == "failed", 20, what="the ghost run")
        assert "cronsul-no-such-user" in record(r, ghost)["error"]
        plain = enqueue_id(cfg, "plain")
        wait_until(lambda: record(r, plain).get("state") == "succeeded", 20, what="plain run")
        assert record(r, plain)["output"].strip() == "served"
        nobody = pwd.getpwnam("nobody")
        run = enqueue_id(cfg, "asnobody")
        wait_until(lambda: record(r, run).get("state") == "succeeded", 20, what="nobody's run")
        assert record(r, run)["output"].split() == [nobody.pw_dir, "nobody", "nobody", "/bin/sh"]
    finally:
        cluster.stop()


def test_a_resolved_identity_is_not_looked_up_again(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookups(name: str) -> pwd.struct_passwd:
        raise AssertionError(f"getpwnam({name!r}) called")

    monkeypatch.setattr(pwd, "getpwnam", no_lookups)
    from worker.reactor import Reactor

    reactor = Reactor("t").start()
    try:
        start = functools.partial(Execution(None, 1, reactor=reactor).start, identity={})
        out = reactor.wait_for(start, ["/bin/echo", "hi"], {"PATH": "/usr/bin:/bin"}, None, 5,
                               "someone")
    finally:
        reactor.stop()
    assert out.ok and out.output.strip() == "hi"
