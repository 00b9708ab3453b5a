"""A real redis-server with requirepass, an ACL user and TLS only (certificates made here with
the openssl CLI): a real agent and the CLI connect with ``rediss://`` + ``tls_ca_file`` +
``username`` + ``password_file``; a wrong password is a clear exit 2 that never shows the
secret; an unknown CA is exit 3. The agent also proves the root rule end to end: a job with
neither ``user`` nor ``allow_root`` is recorded failed without running, ``user = "nobody"``
runs as nobody."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cronsul_testing import REPO, Cluster, free_port, render_config, require_binary, wait_until

from devconsul.testing import DevConsul
from worker.keys import Keys

KEYS = Keys("cronsul")
PASSWORD = "tls-s3cret-Pw"
ADMIN_PASSWORD = "admin-s3cret-Pw"
# What the agent needs: its own keys, pub/sub off, and no admin or dangerous commands.
ACL_RULE = f"on >{PASSWORD} ~cronsul:* resetchannels +@all -@admin -@dangerous"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """ca.pem signs server.pem (CN/SAN 127.0.0.1) and client.pem; other-ca.pem signs nothing."""
    require_binary("openssl")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN=cronsul test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    for leaf in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{leaf}.pem",
                cwd=d)
    for key in d.glob("*.key"):
        key.chmod(0o600)


@dataclass
class TlsRedis:
    port: int
    pki: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=ADMIN_PASSWORD, ssl=True,
                           ssl_ca_certs=str(self.pki / "ca.pem"),
                           ssl_certfile=str(self.pki / "client.pem"),
                           ssl_keyfile=str(self.pki / "client.key"))


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    binary = require_binary("redis-server")
    d = tmp_path_factory.mktemp("tls")
    make_pki(d)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
         "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "optional",
         "--requirepass", ADMIN_PASSWORD, "--user", "cronsul", *ACL_RULE.split(),
         "--save", "", "--appendonly", "no", "--dir", str(d), "--loglevel", "warning"],
        stdout=open(d / "redis.log", "ab"),  # noqa: SIM115  # the server process owns it
        stderr=subprocess.STDOUT)
    server = TlsRedis(port, d, proc)

    def up() -> bool:
        try:
            return bool(server.admin().ping())
        except redis.RedisError:
            return False

    try:
        wait_until(up, 10, what=f"TLS redis-server on {port}")
        yield server
    finally:
        proc.terminate()
        proc.wait(10)


def secret_file(d: Path, text: str) -> Path:
    path = d / "redis.password"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=60)


def write_config(d: Path, redis_table: dict[str, object]) -> Path:
    path = d / "cronsul.toml"
    path.write_text(render_config(
        {"agent": {"node": "n1"}, "consul": {"address": f"127.0.0.1:{free_port()}"},
         "redis": redis_table},
        {"tick": {"schedule": "@yearly", "command": ["/bin/true"]}}))
    path.chmod(0o600)
    return path


def test_cli_with_acl_user_password_file_and_tls(tmp_path: Path, tls_redis: TlsRedis) -> None:
    cfg = write_config(tmp_path, {
        "url": tls_redis.url, "username": "cronsul",
        "password_file": str(secret_file(tmp_path, PASSWORD)),
        "tls_ca_file": str(tls_redis.pki / "ca.pem"),
        "tls_cert_file": str(tls_redis.pki / "client.pem"),
        "tls_key_file": str(tls_redis.pki / "client.key")})
    enqueued = cli("run", "tick", "-c", str(cfg))
    assert enqueued.returncode == 0, enqueued.stderr
    run_id = enqueued.stdout.strip()
    assert tls_redis.admin().hget(KEYS.run(run_id), "state") == b"queued"
    for args in (["dlq", "list"], ["history", "tick"], ["logs", run_id]):
        done = cli(*args, "-c", str(cfg))
        assert done.returncode == 0, (args, done.stderr)
        assert PASSWORD not in done.stdout + done.stderr
    # The ACL user cannot step outside its keys: a clear refusal, exit 1, no secret.
    text = cfg.read_text().replace("[redis]\n", '[redis]\nkey_prefix = "other"\n')
    cfg.write_text(text)
    denied = cli("dlq", "list", "-c", str(cfg))
    assert denied.returncode == 1, denied.stderr
    assert "no permissions" in denied.stderr and PASSWORD not in denied.stderr


@pytest.mark.parametrize("command", [["dlq", "list"], ["run", "tick"], ["agent"]])
def test_wrong_password_is_exit_2_naming_the_key_and_never_the_secret(
        tmp_path: Path, tls_redis: TlsRedis, command: list[str]) -> None:
    wrong = "wr0ng-s3cret"
    cfg = write_config(tmp_path, {
        "url": tls_redis.url, "username": "cronsul",
        "password_file": str(secret_file(tmp_path, wrong)),
        "tls_ca_file": str(tls_redis.pki / "ca.pem")})
    t0 = time.monotonic()
    done = cli(*command, "-c", str(cfg))
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - t0 < 15  # not retried like an outage
    assert "[redis]" in done.stderr and "refused the credentials" in done.stderr
    assert f"rediss://127.0.0.1:{tls_redis.port}/0" in done.stderr
    assert wrong not in done.stdout + done.stderr and PASSWORD not in done.stderr


def test_password_in_the_url_is_redacted_in_errors(tmp_path: Path, tls_redis: TlsRedis) -> None:
    cfg = write_config(tmp_path, {
        "url": f"rediss://cronsul:bad-{PASSWORD}@127.0.0.1:{tls_redis.port}/0",
        "tls_ca_file": str(tls_redis.pki / "ca.pem")})
    done = cli("dlq", "list", "-c", str(cfg))
    assert done.returncode == 2
    assert f"rediss://***@127.0.0.1:{tls_redis.port}/0" in done.stderr
    assert PASSWORD not in done.stderr


def test_unknown_ca_is_exit_3(tmp_path: Path, tls_redis: TlsRedis) -> None:
    cfg = write_config(tmp_path, {
        "url": tls_redis.url, "username": "cronsul",
        "password_file": str(secret_file(tmp_path, PASSWORD)),
        "tls_ca_file": str(tls_redis.pki / "other-ca.pem")})
    done = cli("dlq", "list", "-c", str(cfg))
    assert done.returncode == 3, done.stderr
    assert "certificate verify failed" in done.stderr and PASSWORD not in done.stderr


@pytest.mark.slow
def test_agent_over_tls_with_acl_user_and_the_root_rule(
        tmp_path: Path, devconsul: DevConsul, tls_redis: TlsRedis) -> None:
    assert os.geteuid() == 0 or pytest.skip("the root rule needs the agent to run as root")
    admin = tls_redis.admin()
    admin.flushdb()
    ticks, marker = tmp_path / "ticks", tmp_path / "ran-as-root"
    jobs = {
        "tick": {"schedule": "* * * * * *", "timeout": "5s",
                 "command": ["/bin/sh", "-c", f'echo "$CRONSUL_SCHEDULED_AT" >> {ticks}']},
        # neither user nor allow_root: refused, recorded failed, never started
        "asroot": {"schedule": "* * * * * *", "timeout": "5s", "allow_root": False,
                   "command": ["/bin/sh", "-c", f"touch {marker}"]},
        "asnobody": {"schedule": "* * * * * *", "timeout": "5s", "user": "nobody",
                     "command": ["/bin/sh", "-c", "echo $(id -u) $(id -un)"]},
    }
    cluster = Cluster(tmp_path, devconsul, tls_redis.url, ["n1"], jobs, redis_extra={
        "username": "cronsul", "password_file": str(secret_file(tmp_path, PASSWORD)),
        "tls_ca_file": str(tls_redis.pki / "ca.pem")}).start()
    try:
        wait_until(lambda: ticks.exists() and len(ticks.read_text().split()) >= 3, 30,
                   what="three ticks over TLS")

        def finished(job: str) -> dict[str, str] | None:
            for run_id in admin.zrange(KEYS.history(job), 0, -1):
                rec = {k.decode(): v.decode() for k, v in admin.hgetall(
                    KEYS.run(run_id.decode())).items()}
                if rec.get("state") in ("failed", "succeeded"):
                    return rec
            return None

        refused = wait_until(lambda: finished("asroot"), 15, what="the refused run recorded")
        assert refused["state"] == "failed" and refused["exit_code"] == ""
        assert refused["error"].startswith("refused to run as root"), refused
        nobody = wait_until(lambda: finished("asnobody"), 15, what="the run as nobody")
        assert nobody["state"] == "succeeded" and nobody["output"].strip() == "65534 nobody"
        assert not marker.exists()
        log = cluster.agents["n1"].log.read_text()
        assert PASSWORD not in log
    except AssertionError:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
