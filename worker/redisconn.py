"""The one way cronsul connects to Redis: the ``[redis]`` section and the client factory.

The agent, ``/healthz`` and every command (``run``, ``history``, ``logs``, ``dlq``) get their
client from :func:`redis_client`, so a URL, an ACL user, a password file, TLS or a Sentinel
deployment configured once works everywhere. Two shapes:

* ``url = "redis://host:6379/0"`` (``rediss://`` for TLS, ``unix:///run/redis.sock?db=0``):
  one endpoint, which may be a managed service's primary endpoint that moves on failover.
* ``sentinels = ["h1:26379", ...]`` and ``master_name``: redis-py's Sentinel client asks the
  sentinels for the current primary on every new connection; ``db`` and ``tls`` replace what
  the URL would say.

Every command is retried on connection errors and timeouts with backoff (:data:`FAILOVER_S`
in total), so agents ride through a failover or a primary endpoint moving without operator
action; a demoted primary's READONLY answer counts as a connection error (redis-py's
SentinelManagedConnection). Wrong credentials are never retried.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from scheduler.errors import ConfigError, ConnectionFailure, QueueError
from worker.secretfiles import redact
from worker.tomlread import Section

T = TypeVar("T")

DEFAULT_URL = "redis://127.0.0.1:6379/0"
# Backoff between retries of one command: 0.1 s doubling to 1 s. Sentinel promotes a replica
# about a second after SENTINEL FAILOVER, and down-after-milliseconds + ~1 s after a crash;
# managed services move their primary endpoint in a few seconds. AGENT_RETRIES rides out about
# FAILOVER_S of that before the caller sees the error (and its own loop retries again).
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.1, 1.0
AGENT_RETRIES = 14
FAILOVER_S = 0.2 + 0.4 + 0.8 + (AGENT_RETRIES - 3) * BACKOFF_CAP_S  # 12.4 s
# An operator's command waits less: it reports "cannot reach Redis" (exit 3) after ~2 s.
COMMAND_RETRIES = 3
COMMAND_TIMEOUT_S = 5.0
# A sentinel that does not answer is skipped for the next one, at once.
SENTINEL_TIMEOUT_S = 2.0
# A password file holds one line; anything bigger is not a password file.
SECRET_FILE_MAX = 4096
# Wrong credentials do not get better by retrying (AuthenticationError is a ConnectionError).
AUTH_ERRORS = (AuthenticationError, AuthorizationError)


@dataclass(frozen=True)
class RedisSection:
    url: str
    key_prefix: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # from password_file
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: bool = False

    @property
    def where(self) -> str:
        """Where Redis is, for messages and logs: never with a password."""
        if self.sentinels:
            hosts = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel master {self.master_name!r} (db {self.db}) via {hosts}"
        return redact(self.url)


def redis_section(s: Section) -> RedisSection:
    """Parse and check ``[redis]``; reads the password files. Errors name file, table, key."""
    sentinels = _sentinels(s)
    master_name = s.string("master_name")
    url_given = s.raw("url") is not None
    url = s.string("url", DEFAULT_URL) or DEFAULT_URL
    if sentinels and url_given:
        raise s.fail("url", "set url (one endpoint) or sentinels + master_name, not both")
    if sentinels and master_name is None:
        raise s.fail("master_name", "is required with sentinels (the name in sentinel.conf's "
                     "`sentinel monitor <name> ...`)")
    if master_name is not None and not sentinels:
        raise s.fail("sentinels", 'is required with master_name, e.g. ["10.0.0.1:26379"]')
    db = s.integer("db", 0, low=0, high=1_000_000)
    tls = s.boolean("tls", False)
    if not sentinels:
        for name in ("db", "tls"):
            if name in s.data:
                raise s.fail(name, "only applies with sentinels; with url it goes in the URL "
                             "(redis://host:port/<db>, rediss:// for TLS)")
    url_user, url_password, scheme = _check_url(s, url) if not sentinels else (None, None, "")
    username = s.string("username")
    if username is not None and url_user is not None:
        raise s.fail("username", "the url already names a user; set it in one place")
    password = _secret_file(s, "password_file")
    if password is not None and url_password is not None:
        raise s.fail("password_file", "the url already holds a password; set it in one place "
                     "(the file keeps it out of the config)")
    sentinel_password = s.string("sentinel_password")
    from_file = _secret_file(s, "sentinel_password_file")
    if sentinel_password is not None and from_file is not None:
        raise s.fail("sentinel_password_file", "set sentinel_password or "
                     "sentinel_password_file, not both")
    sentinel_password = sentinel_password if sentinel_password is not None else from_file
    if sentinel_password is not None and not sentinels:
        raise s.fail("sentinel_password", "only applies with sentinels")
    ca, cert, key = (_readable(s, k) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file"))
    if (ca or cert or key) and not (tls or scheme == "rediss"):
        bad = "tls_ca_file" if ca else "tls_cert_file" if cert else "tls_key_file"
        raise s.fail(bad, "needs TLS: a rediss:// url (or tls = true with sentinels)")
    if key and not cert:
        raise s.fail("tls_key_file", "needs tls_cert_file (the client certificate)")
    out = RedisSection(
        url=url, key_prefix=s.string("key_prefix", "cronsul") or "cronsul",
        username=username, password=password, tls_ca_file=ca, tls_cert_file=cert,
        tls_key_file=key, sentinels=sentinels, master_name=master_name,
        sentinel_password=sentinel_password, db=db, tls=tls,
    )
    s.check_unknown()
    return out


def _check_url(s: Section, url: str) -> tuple[str | None, str | None, str]:
    shown = redact(url)
    if urlparse(url).scheme not in ("redis", "rediss", "unix"):
        raise s.fail("url", f"{shown!r} is not a redis://, rediss:// or unix:// URL")
    try:
        parts = _parse_url(url)
        urlparse(url).port  # noqa: B018  # raises ValueError for a bad port
    except ValueError as exc:
        raise s.fail("url", f"{shown!r}: {redact(str(exc))}") from exc
    extra = sorted(set(parts) - {"host", "port", "db", "path", "username", "password",
                                 "connection_class"})
    if extra:
        raise s.fail("url", f"{shown!r}: URL option {extra[0]!r} is not supported; use the "
                     "[redis] keys (password_file, username, tls_*)")
    if parts.get("connection_class") is not redis.UnixDomainSocketConnection \
            and not parts.get("host"):
        raise s.fail("url", f"{shown!r} names no host")
    return parts.get("username"), parts.get("password"), urlparse(url).scheme


def _parse_url(url: str) -> dict[str, Any]:
    parts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    return parts


def _sentinels(s: Section) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in s.strings("sentinels") or []:
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")  # "[::1]:26379"
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise s.fail("sentinels", f"{item!r} is not host:port (e.g. \"10.0.0.1:26379\")")
        out.append((host, int(port)))
    if "sentinels" in s.data and not out:
        raise s.fail("sentinels", "must list at least one sentinel")
    return tuple(out)


def _readable(s: Section, key: str) -> str | None:
    path = s.string(key)
    if path is None:
        return None
    full = Path(path) if Path(path).is_absolute() else s.path.parent / path
    try:
        with open(full, "rb"):
            pass
    except OSError as exc:
        raise s.fail(key, f"cannot read {full}: {exc.strerror}") from exc
    return str(full)


def _secret_file(s: Section, key: str) -> str | None:
    path = _readable(s, key)
    if path is None:
        return None
    with open(path, "rb") as f:
        raw = f.read(SECRET_FILE_MAX + 1)
    if len(raw) > SECRET_FILE_MAX:
        raise s.fail(key, f"{path} is larger than {SECRET_FILE_MAX} bytes: not a password file")
    try:
        secret = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise s.fail(key, f"{path} is not UTF-8 text") from exc
    if not secret or "\n" in secret:
        raise s.fail(key, f"{path} must hold the secret on one line")
    return secret


# -- the client ---------------------------------------------------------------------------------

class _FailoverRetry(Retry):
    """redis-py's Retry, except that refused credentials fail at once."""

    def call_with_retry(self, do: Callable[[], T], fail: Any,
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        def retryable(error: Exception) -> bool:
            if isinstance(error, AUTH_ERRORS):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


class _SentinelConnection(SentinelManagedConnection):
    """Re-resolves the primary on every reconnect. redis-py 8.1 reconnects a dropped connection
    inside its retry loop through ``connect_check_health``, which skips the Sentinel lookup in
    ``connect``: after a failover it kept dialling the dead primary for the whole retry budget
    (measured: 12.4 s instead of the 2 s Sentinel took to promote the replica)."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class _SentinelSSLConnection(_SentinelConnection, redis.SSLConnection):
    pass


def redis_client(cfg: RedisSection, *, socket_timeout: float = COMMAND_TIMEOUT_S,
                 connect_timeout: float = COMMAND_TIMEOUT_S, retries: int = COMMAND_RETRIES,
                 health_check_interval: int = 0) -> redis.Redis:
    """A client for ``cfg``. ``retries`` bounds how often one command is retried on a
    connection error or timeout (AGENT_RETRIES rides out a failover; 0: fail at once)."""
    backoff = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S) if retries else NoBackoff()
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout,
        "retry": _FailoverRetry(backoff, retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": health_check_interval,
    }
    tls = _tls_options(cfg)
    if cfg.sentinels:
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "retry": Retry(NoBackoff(), 0), "password": cfg.sentinel_password,
            **({"ssl": True, **tls} if cfg.tls else {}),
        }
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(cfg.sentinels), sentinel_kwargs=sentinel_kwargs)
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            cfg.master_name, db=cfg.db, username=cfg.username, password=cfg.password,
            connection_class=_SentinelSSLConnection if cfg.tls else _SentinelConnection,
            **common, **(tls if cfg.tls else {}))
        return client
    parts = _parse_url(cfg.url)
    kwargs: dict[str, Any] = {
        **common, "db": parts.get("db", 0),
        "username": parts.get("username", cfg.username),
        "password": parts.get("password", cfg.password),
    }
    if parts.get("connection_class") is redis.UnixDomainSocketConnection:
        kwargs["unix_socket_path"] = parts.get("path")
    else:
        kwargs.update(host=parts["host"], port=parts.get("port", 6379))
        if urlparse(cfg.url).scheme == "rediss":
            kwargs.update(ssl=True, **tls)
    return redis.Redis(**kwargs)


def _tls_options(cfg: RedisSection) -> dict[str, Any]:
    return {"ssl_cert_reqs": "required", "ssl_ca_certs": cfg.tls_ca_file,
            "ssl_certfile": cfg.tls_cert_file, "ssl_keyfile": cfg.tls_key_file}


def is_auth_error(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, AUTH_ERRORS) or text.startswith(("WRONGPASS", "NOAUTH"))


def failure(cfg: RedisSection, path: os.PathLike[str] | str, exc: redis.RedisError) -> Exception:
    """The cronsul error for a Redis failure: wrong credentials are a config error (exit 2),
    an unreachable Redis exit 3, anything else a refused operation (exit 1). No secrets."""
    text = redact(str(exc))
    if is_auth_error(exc):
        return ConfigError(f"{path}: [redis]: Redis at {cfg.where} refused the credentials "
                           f"(username / password_file / the url's password): {text}")
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return ConnectionFailure(f"cannot reach Redis at {cfg.where}: {text}")
    return QueueError(f"Redis at {cfg.where} refused: {text}")


@contextmanager
def connect(cfg: RedisSection, path: os.PathLike[str] | str) -> Iterator[redis.Redis]:
    """A command's client; Redis failures become cronsul errors (see :func:`failure`)."""
    client = redis_client(cfg)
    try:
        yield client
    except redis.RedisError as exc:
        raise failure(cfg, path, exc) from exc
    finally:
        client.close()
