"""Shared test support: a real redis-server on a free port, and a cluster of real agent processes.

A missing service (no redis-server binary) skips a test locally but fails it under CI=true, so
CI can never pass by skipping what it was meant to prove.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unavailable(message: str) -> None:
    """A missing service skips a test locally but fails it under CI=true."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str, package: str = "redis-server") -> str:
    """The path of ``name``; when it is missing and we are root, Debian's ``package`` is
    installed first (a fresh machine has none of them). Otherwise: skip locally, fail in CI."""
    path = shutil.which(name)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
        if subprocess.run(install, capture_output=True, env=env, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env,
                           timeout=600)
            subprocess.run(install, capture_output=True, env=env, timeout=900)
        path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (apt-get install {package})")
    assert path is not None
    return path


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM a server we started, SIGKILL it if it is still there after ``grace_s``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """A real redis-server process on a free loopback port, with its data in a temp dir."""

    def __init__(self, workdir: Path, appendonly: bool = False,
                 extra: tuple[str, ...] = ()) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self.dir = workdir
        self.appendonly = appendonly
        self.extra = extra  # more redis-server arguments
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.dir),
             "--daemonize", "no", "--loglevel", "warning", *self.extra],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        wait_until(lambda: _ping(client), 10, what=f"redis-server on {self.port}")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        terminate(self.proc, 5)
        self.proc = None


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# Credentials moto accepts; boto3 reads them from the environment (the agents inherit it).
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    """moto in server mode (SQS over real HTTP) on a free loopback port."""

    def __init__(self, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **AWS_TEST_ENV})
        finally:
            if not isinstance(out, int):
                out.close()  # the child has its own copy

        def up() -> bool:
            try:
                return requests.get(f"{self.url}/moto-api/", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        try:
            wait_until(up, 30, interval=0.1, what="moto server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.proc = None


@contextmanager
def redis_server(appendonly: bool = False) -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="cronsul-redis-") as d:
        server = RedisServer(Path(d), appendonly).start()
        try:
            yield server
        finally:
            server.stop()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def root_safe(body: dict[str, Any]) -> dict[str, Any]:
    """Tests run as root in CI containers, and an agent running as root refuses a job that sets
    neither ``user`` nor ``allow_root`` (worker/executor.py root_refusal): say it explicitly."""
    if "user" in body or "allow_root" in body:
        return body
    return {**body, "allow_root": True}


def render_config(sections: dict[str, dict[str, Any]], jobs: dict[str, dict[str, Any]]) -> str:
    """TOML for ``sections`` and ``jobs``; every job without user/allow_root gets
    ``allow_root = true`` (see :func:`root_safe`)."""
    jobs = {name: root_safe(body) if isinstance(body, dict) else body
            for name, body in jobs.items()}
    lines: list[str] = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
        lines.append("")
    for name, body in jobs.items():
        lines.append(f"[jobs.{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
        lines.append("")
    return "\n".join(lines)


class AgentProcess:
    """One real `cronsul agent` process."""

    def __init__(self, node: str, config: Path, log: Path) -> None:
        self.node = node
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        env = dict(os.environ)
        # tests/ too, so callable jobs can name test fixtures (tests/pyjobs_fixture.py).
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{REPO / 'tests'}"
        env.pop("CONSUL_HTTP_TOKEN", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "agent", "-c", str(self.config)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """N agents sharing one redis-server and one Consul (each node with its own agent endpoint)."""

    def __init__(self, workdir: Path, consul: Any, redis_url: str, nodes: list[str],
                 jobs: dict[str, dict[str, Any]], consul_extra: dict[str, Any] | None = None,
                 worker_extra: dict[str, Any] | None = None,
                 extra_sections: dict[str, dict[str, Any]] | None = None,
                 redis_extra: dict[str, Any] | None = None) -> None:
        """``extra_sections``: more top-level tables, e.g. {"queue": {"backend": "sqs", ...}}.
        ``redis_extra``: more [redis] keys (sentinels, password_file, ...); an empty
        ``redis_url`` leaves url out (sentinels replace it)."""
        self.dir = workdir
        self.consul = consul
        self.redis_url = redis_url
        self.agents: dict[str, AgentProcess] = {}
        self.consul_http = f"http://{consul.address}"
        for node in nodes:
            address = consul.add_agent(node)
            cfg = render_config(
                {
                    "agent": {"node": node, "address": "127.0.0.1"},
                    "consul": {"address": address, "session_ttl": "10s", "check_ttl": "2s",
                               "lock_delay": "2s", **(consul_extra or {})},
                    "redis": {**({"url": redis_url} if redis_url else {}),
                              **(redis_extra or {})},
                    "worker": {"concurrency": 4, "visibility_timeout": "4s",
                               "shutdown_grace": "5s", "kill_grace": "1s",
                               **(worker_extra or {})},
                    **(extra_sections or {}),
                },
                jobs,
            )
            path = workdir / f"{node}.toml"
            path.write_text(cfg)
            self.agents[node] = AgentProcess(node, path, workdir / f"{node}.log")

    def start(self) -> Cluster:
        for agent in self.agents.values():
            agent.start()
        return self

    def leader_entry(self) -> dict[str, Any] | None:
        try:
            r = requests.get(f"{self.consul_http}/v1/kv/cronsul/leader", timeout=2)
        except requests.RequestException:
            return None
        if r.status_code != 200:
            return None
        entry: dict[str, Any] = r.json()[0]
        return entry

    def leader(self) -> str | None:
        """The node whose session holds the leader key, from Consul itself."""
        import base64

        entry = self.leader_entry()
        if not entry or not entry.get("Session") or not entry.get("Value"):
            return None
        value = json.loads(base64.b64decode(entry["Value"]))
        node: str = value["node"]
        return node

    def wait_leader(self, timeout: float, exclude: str | None = None) -> str:
        def check() -> str | None:
            node = self.leader()
            return node if node and node != exclude else None

        node: str = wait_until(check, timeout, interval=0.02, what="a leader")
        return node

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {a.node} ---\n{a.log.read_text(errors='replace')[-6000:]}"
                         for a in self.agents.values() if a.log.exists())


class LoneConsumer:
    """One node's Consumer on a real Redis with no agent around it (no Consul): its queue, run
    state and watchdog, for tests that drive the consumer directly. ``close()`` when done."""

    def __init__(self, tmp_path: Path, redis_url: str, jobs: dict[str, dict[str, Any]],
                 worker: dict[str, Any] | None = None, clock: Any = None) -> None:
        from scheduler.clock import SystemClock
        from worker.config import load_config
        from worker.consumer import Consumer
        from worker.keys import Keys
        from worker.queue import RedisQueue
        from worker.runstate import RunState
        from worker.watchdog import Watchdog

        path = tmp_path / "n1.toml"
        path.write_text(render_config(
            {"agent": {"node": "n1"}, "consul": {"address": "127.0.0.1:1"},
             "redis": {"url": redis_url}, "worker": {"concurrency": 2, **(worker or {})}},
            jobs))
        self.cfg = load_config(path)
        self.redis = redis.Redis.from_url(redis_url)
        self.keys = Keys("cronsul")
        self.queue = RedisQueue(self.redis, self.keys, "n1")
        self.queue.ensure_groups(["default"])
        self.runs = RunState(self.redis, self.keys, "n1", 3600)
        self.watchdog = Watchdog()
        self.watchdog.start()
        self.consumer = Consumer(self.cfg, self.queue, self.runs, self.watchdog,
                                 clock or SystemClock())

    def start_finisher(self) -> None:
        """The fetch loop starts the finisher; a test driving ``_start`` by hand starts it
        here."""
        import threading

        c = self.consumer
        c._finisher = threading.Thread(target=c._finish_loop, daemon=True)
        c._finisher.start()

    def close(self) -> None:
        self.consumer.close()
        self.watchdog.stop()
