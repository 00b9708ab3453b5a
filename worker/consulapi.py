"""python-consul2 clients with a timeout on every call, and one error type for "Consul failed"."""

from __future__ import annotations

from dataclasses import dataclass

import requests

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


def make_clients(cfg: ConsulSection, wait_s: float) -> ConsulClients:
    def client(timeout: float) -> consul.Consul:
        return consul.Consul(host=cfg.host, port=cfg.port, token=cfg.token, scheme=cfg.scheme,
                             timeout=timeout)

    blocking_timeout = wait_s + wait_s / 16 + BLOCKING_MARGIN_S
    return ConsulClients(client(CALL_TIMEOUT_S), client(blocking_timeout), wait_s)
