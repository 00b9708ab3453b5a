"""Helpers for the Consul contract suite: written for both the dev server and a real agent."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests

import consul
from devconsul.testing import DevConsul

T = TypeVar("T")


@dataclass
class Target:
    """The Consul under test: a real agent (CONSUL_HTTP_ADDR) or the dev server."""

    address: str  # host:port
    dev: DevConsul | None = None
    node: str = ""
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def url(self) -> str:
        return "http://" + self.address

    @property
    def host(self) -> str:
        return self.address.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def client(self, timeout: float = 10.0) -> Any:
        return consul.Consul(host=self.host, port=self.port, timeout=timeout)

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 10)
        return self.http.get(self.url + path, **kw)

    def put(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 10)
        return self.http.put(self.url + path, **kw)


def unique(prefix: str = "contract") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def eventually(fn: Callable[[], T | None], timeout: float = 5.0, interval: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy (real agents sync the catalog
    asynchronously, so even the dev server's immediate answers are read this way)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        time.sleep(interval)


def catalog_check(c: Any, node: str, check_id: str) -> dict[str, Any] | None:
    _, checks = c.health.node(node)
    return next((ch for ch in checks if ch["CheckID"] == check_id), None)


def wait_check_status(c: Any, node: str, check_id: str, status: str,
                      timeout: float = 5.0) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        ch = catalog_check(c, node, check_id)
        return ch if ch is not None and ch["Status"] == status else None

    return eventually(probe, timeout)


def session_gone(c: Any, session_id: str) -> bool:
    _, info = c.session.info(session_id)
    return info is None
