"""[redis] section validation, the client factory's shape, redaction and secret-file warnings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import redis
from cronsul_testing import render_config
from redis.sentinel import SentinelConnectionPool

from scheduler.errors import ConfigError, ConnectionFailure, QueueError
from worker.cli import main
from worker.config import load_config
from worker.redisconn import failure, redis_client
from worker.secretfiles import exposure_warnings, redact

JOBS = {"tick": {"schedule": "@daily", "command": ["/bin/true"]}}


def write(tmp_path: Path, redis_table: dict[str, Any], consul: dict[str, Any] | None = None,
          mode: int = 0o600) -> Path:
    path = tmp_path / "cronsul.toml"
    path.write_text(render_config({"agent": {"node": "n1"}, "consul": consul or {},
                                   "redis": redis_table}, JOBS))
    path.chmod(mode)
    return path


def secret(tmp_path: Path, text: str = "s3cret-pw\n", mode: int = 0o600,
           name: str = "redis.pw") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(("table", "key", "message"), [
    ({"url": "http://x"}, "url", "is not a redis://"),
    ({"url": "redis://:pw@h:99999/0"}, "url", "'redis://***@h:99999/0'"),
    ({"url": "redis://h/0?ssl_cert_reqs=none"}, "url", "URL option 'ssl_cert_reqs'"),
    ({"url": "redis://h/0", "sentinels": ["a:1"], "master_name": "m"}, "url", "not both"),
    ({"sentinels": ["a:1"]}, "master_name", "is required with sentinels"),
    ({"master_name": "m"}, "sentinels", "is required with master_name"),
    ({"sentinels": ["a"], "master_name": "m"}, "sentinels", "is not host:port"),
    ({"sentinels": [], "master_name": "m"}, "sentinels", "at least one"),
    ({"url": "redis://h/0", "db": 2}, "db", "only applies with sentinels"),
    ({"url": "redis://u:p@h/0", "username": "v"}, "username", "already names a user"),
    ({"url": "redis://h/0", "tls_ca_file": "/etc/hostname"}, "tls_ca_file", "needs TLS"),
    ({"url": "rediss://h/0", "tls_ca_file": "/nonexistent/ca.pem"}, "tls_ca_file",
     "cannot read /nonexistent/ca.pem"),
    ({"url": "rediss://h/0", "tls_key_file": "/etc/hostname"}, "tls_key_file",
     "needs tls_cert_file"),
    ({"url": "redis://h/0", "password_file": "/nonexistent/pw"}, "password_file",
     "cannot read"),
    ({"url": "redis://h/0", "sentinel_password": "x"}, "sentinel_password",
     "only applies with sentinels"),
    ({"url": "redis://h/0", "sentinels": "a:1"}, "sentinels", "expected a list of strings"),
    ({"url": "redis://h/0", "bogus": 1}, "bogus", "unknown key"),
])
def test_redis_section_errors_name_file_section_and_key(
        tmp_path: Path, table: dict[str, Any], key: str, message: str) -> None:
    path = write(tmp_path, table)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: [redis] {key}: "), exc.value
    assert message in str(exc.value)
    assert "pw@" not in str(exc.value)


def test_password_in_url_and_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, {"url": "redis://:a@h/0", "password_file": secret(tmp_path)})
    with pytest.raises(ConfigError, match=r"\[redis\] password_file: the url already holds"):
        load_config(path)


@pytest.mark.parametrize(("text", "problem"), [
    ("", "on one line"), ("a\nb\n", "on one line"), ("x" * 5000, "larger than 4096"),
])
def test_bad_password_files_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, {"url": "redis://h/0", "password_file": secret(tmp_path, text)})
    with pytest.raises(ConfigError, match=problem) as exc:
        load_config(path)
    assert "[redis] password_file" in str(exc.value)


def test_password_file_is_read_at_load_and_never_shown(tmp_path: Path) -> None:
    path = write(tmp_path, {"url": "redis://127.0.0.1:6390/3", "username": "cronsul",
                            "password_file": secret(tmp_path)})
    cfg = load_config(path)
    assert cfg.redis.password == "s3cret-pw"  # one trailing newline stripped
    assert "s3cret" not in repr(cfg) and "s3cret" not in cfg.redis.where
    client = redis_client(cfg.redis)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"], kwargs["port"]) == (
        "cronsul", "s3cret-pw", 3, 6390)


def test_consul_token_is_not_in_the_repr(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}, consul={"token": "consul-s3cret"}))
    assert cfg.consul.token == "consul-s3cret" and "consul-s3cret" not in repr(cfg)


def test_rediss_url_gives_a_verifying_tls_client(tmp_path: Path) -> None:
    ca = secret(tmp_path, "not really a CA\n", name="ca.pem")
    cfg = load_config(write(tmp_path, {"url": "rediss://h:6380/0", "tls_ca_file": ca}))
    pool = redis_client(cfg.redis).connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert pool.connection_kwargs["ssl_ca_certs"] == ca
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"


def test_unix_socket_url(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {"url": "unix:///run/redis/redis.sock?db=2"}))
    pool = redis_client(cfg.redis).connection_pool
    assert issubclass(pool.connection_class, redis.UnixDomainSocketConnection)
    assert pool.connection_kwargs["path"] == "/run/redis/redis.sock"
    assert pool.connection_kwargs["db"] == 2


def test_sentinel_client_resolves_the_master_through_sentinels(tmp_path: Path) -> None:
    pw = secret(tmp_path)
    cfg = load_config(write(tmp_path, {
        "sentinels": ["10.0.0.1:26379", "[::1]:26380"], "master_name": "jobs", "db": 1,
        "password_file": pw, "sentinel_password": "sentinel-s3cret"}))
    assert cfg.redis.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert cfg.redis.where == "sentinel master 'jobs' (db 1) via 10.0.0.1:26379, ::1:26380"
    assert "s3cret" not in repr(cfg)
    client = redis_client(cfg.redis)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "jobs"
    assert pool.connection_kwargs["password"] == "s3cret-pw"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["password"] for s in sentinels] == [
        "sentinel-s3cret"] * 2


def test_agent_client_retries_through_a_failover_but_not_bad_credentials() -> None:
    from worker.redisconn import AGENT_RETRIES, _FailoverRetry
    from worker.redisconn import RedisSection as R

    client = redis_client(R("redis://127.0.0.1:1/0", "p"), retries=AGENT_RETRIES)
    retry = client.connection_pool.connection_kwargs["retry"]
    assert isinstance(retry, _FailoverRetry) and retry.get_retries() == AGENT_RETRIES
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise redis.AuthenticationError("WRONGPASS invalid username-password pair")

    with pytest.raises(redis.AuthenticationError):
        retry.call_with_retry(refused, lambda e: None)
    assert calls == [1]  # not retried
    flaky = iter([redis.ConnectionError("down"), redis.TimeoutError("slow"), None])

    def recovers() -> str:
        err = next(flaky)
        if err is not None:
            raise err
        return "ok"

    fast = _FailoverRetry(__import__("redis.backoff").backoff.NoBackoff(), AGENT_RETRIES)
    assert fast.call_with_retry(recovers, lambda e: None) == "ok"


@pytest.mark.parametrize(("exc", "kind", "exit_code"), [
    (redis.AuthenticationError("WRONGPASS invalid username-password pair"), ConfigError, 2),
    (redis.ConnectionError("Error 111 connecting to redis://:pw@h:1."), ConnectionFailure, 3),
    (redis.ResponseError("NOPERM this user has no permissions"), QueueError, 1),
])
def test_failures_map_to_exit_codes_without_secrets(
        exc: redis.RedisError, kind: type[Exception], exit_code: int) -> None:
    from worker.redisconn import RedisSection as R

    err = failure(R("redis://:pw@h:1/0", "p"), "/etc/cronsul.toml", exc)
    assert isinstance(err, kind)
    assert "pw" not in str(err).replace("password", "") and "redis://***@h:1/0" in str(err)


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://:secret@host:6379/0", "redis://***@host:6379/0"),
    ("rediss://user:p@ss@host/1", "rediss://***@host/1"),
    ("error connecting to redis://u:pw@10.0.0.1:6379/0 now", "error connecting to "
     "redis://***@10.0.0.1:6379/0 now"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("unix:///run/redis.sock?password=pw&db=0", "unix:///run/redis.sock?password=***&db=0"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


# -- files holding secrets that others can read -------------------------------------------------

@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True),
                                               (0o604, True)])
def test_config_with_a_password_in_the_url_warns_when_others_can_read_it(
        tmp_path: Path, mode: int, warned: bool) -> None:
    cfg = load_config(write(tmp_path, {"url": "redis://:pw@h/0"}, mode=mode))
    # group: our own (root here), which is the layout docs/operations.md recommends
    problems = exposure_warnings(cfg.secret_files)
    assert bool(problems) == warned, problems
    if warned:
        assert "cronsul.toml holds a secret ([redis] url (a password))" in problems[0]
        assert "pw" not in problems[0].replace("password", "")


def test_group_readable_by_another_group_warns(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {}, consul={"token": "t"}, mode=0o640))
    other_gid = os.getegid() + 4242
    os.chown(cfg.path, -1, other_gid)
    [problem] = exposure_warnings(cfg.secret_files)
    assert "([consul] token)" in problem and "readable by group" in problem


def test_secret_files_are_checked_and_a_config_without_secrets_is_not(tmp_path: Path) -> None:
    pw = secret(tmp_path, mode=0o644)
    cfg = load_config(write(tmp_path, {"url": "redis://h/0", "password_file": pw}, mode=0o644))
    [problem] = exposure_warnings(cfg.secret_files)
    assert problem.startswith(f"{pw} holds a secret ([redis] password_file)")


def test_check_command_warns_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, {"url": "redis://:hunter2@h/0"}, mode=0o644)
    assert main(["check", "-c", str(path), "-n", "1"]) == 0
    out, err = capsys.readouterr()
    assert "cronsul: warning:" in err and "readable by every user" in err
    assert "hunter2" not in out + err
