"""Consul ACLs: a token without the right permission is refused at start with the rule it
lacks (exit 2, no retry loop); the right token from token_file works and is never logged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cronsul_testing import REPO, RedisServer, free_port, render_config, wait_until

TOKEN = "b3f1c0de-5ecr-e7t0-ken0-acl0000token"


@pytest.fixture
def acl_consul() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "devconsul", "--port", str(port),
                             "--acl-token", TOKEN], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def agent(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "agent", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)


def config(tmp_path: Path, port: int, redis_url: str, consul_extra: dict[str, str]) -> Path:
    path = tmp_path / "a.toml"
    path.write_text(render_config(
        {"agent": {"node": "n1", "address": "127.0.0.1"},
         "consul": {"address": f"127.0.0.1:{port}", "check_ttl": "2s", "lock_delay": "2s",
                    **consul_extra},
         "redis": {"url": redis_url}},
        {"j": {"schedule": "@yearly", "command": ["/bin/true"], "allow_root": True}}))
    return path


def test_missing_permission_is_a_config_error_naming_the_rule(
        tmp_path: Path, acl_consul: int, redis_proc: RedisServer) -> None:
    proc = agent(config(tmp_path, acl_consul, redis_proc.url, {}))
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    assert "Consul ACL denied register" in out and 'service_prefix "cronsul"' in out, out


def test_token_file_works_and_the_token_is_never_logged(
        tmp_path: Path, acl_consul: int, redis_proc: RedisServer) -> None:
    token_file = tmp_path / "consul.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    proc = agent(config(tmp_path, acl_consul, redis_proc.url, {"token_file": str(token_file)}))
    try:
        def leading() -> bool:
            r = requests.get(f"http://127.0.0.1:{acl_consul}/v1/kv/cronsul/leader",
                             headers={"X-Consul-Token": TOKEN}, timeout=2)
            return r.status_code == 200 and bool(r.json()[0].get("Session"))
        wait_until(leading, 30, what="the agent to lead with its token")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert TOKEN not in out
