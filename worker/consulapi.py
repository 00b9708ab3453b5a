"""python-consul2 clients with a timeout on every call, and one error type for "Consul failed"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

import consul
from worker.config import ConsulSection

# Ordinary calls (renew, acquire, register) should answer in milliseconds; five seconds is long
# enough for a loaded agent and short enough that a partitioned node learns of it quickly.
CALL_TIMEOUT_S = 5.0
# Consul adds up to wait/16 of jitter to a blocking read; this margin covers the round trip.
BLOCKING_MARGIN_S = 2.0

# Everything a Consul call can raise when the agent is unreachable, slow or unhappy.
CONSUL_ERRORS: tuple[type[BaseException], ...] = (
    consul.ConsulException,
    requests.RequestException,
    ValueError,  # a garbled body (a proxy's HTML error page) fails JSON decoding
)


@dataclass(frozen=True)
class ConsulClients:
    """One client for ordinary calls, one whose timeout admits a blocking read of ``wait_s``."""

    call: consul.Consul
    blocking: consul.Consul
    wait_s: float

    @property
    def wait(self) -> str:
        return f"{int(self.wait_s * 1000)}ms"


class _ObservedAdapter(HTTPAdapter):
    """Reports every failed Consul request (for the error counter) without changing it."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        super().__init__()
        self._on_error = on_error

    def send(self, request: requests.PreparedRequest, *args: Any,
             **kwargs: Any) -> requests.Response:
        try:
            response = super().send(request, *args, **kwargs)
        except requests.Timeout:
            self._on_error("timeout")
            raise
        except requests.RequestException:
            self._on_error("unreachable")
            raise
        if response.status_code == 403:
            self._on_error("acl_denied")
        elif response.status_code >= 500:
            self._on_error("server_error")
        return response


def make_clients(cfg: ConsulSection, wait_s: float,
                 on_error: Callable[[str], None] | None = None) -> ConsulClients:
    """``on_error(kind)`` is told of every failed request (kind: timeout, unreachable,
    acl_denied, server_error); a 404 is an answer, not an error."""

    def client(timeout: float) -> consul.Consul:
        c = consul.Consul(host=cfg.host, port=cfg.port, token=cfg.token, scheme=cfg.scheme,
                          timeout=timeout)
        # python-consul2 lets CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN override its arguments. The
        # config already uses them as its defaults, so an explicit setting must win.
        c.http = c.http_connect(cfg.host, cfg.port, cfg.scheme, True, None, timeout)
        c.token = cfg.token
        if on_error is not None:
            adapter = _ObservedAdapter(on_error)
            c.http.session.mount("http://", adapter)
            c.http.session.mount("https://", adapter)
        return c

    blocking_timeout = wait_s + wait_s / 16 + BLOCKING_MARGIN_S
    return ConsulClients(client(CALL_TIMEOUT_S), client(blocking_timeout), wait_s)


# What each operation needs from the agent's ACL token (consul/acl-policy.hcl grants them all).
ACL_RULES = {
    "register": 'service_prefix "cronsul" { policy = "write" }',
    "session": 'session_prefix "" { policy = "write" }',
    "lock": 'key_prefix "<prefix>/" { policy = "write" }',
    "read": 'key_prefix "<prefix>/" { policy = "read" }',
}


def acl_denied(exc: BaseException) -> bool:
    return isinstance(exc, consul.ACLPermissionDenied)


def acl_message(operation: str, prefix: str, exc: BaseException) -> str:
    """A refusal an operator can act on: what was denied and which rule the token lacks."""
    rule = ACL_RULES.get(operation, "see consul/acl-policy.hcl").replace("<prefix>", prefix)
    return (f"Consul ACL denied {operation} ({str(exc).strip()[:120] or 'permission denied'}): "
            f"the token needs {rule} (consul/acl-policy.hcl has the full policy)")
