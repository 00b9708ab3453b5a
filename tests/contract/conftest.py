"""Fixtures of the Consul contract suite.

With CONSUL_HTTP_ADDR set (``host:port`` of a real Consul 1.10+ agent) every test runs
against that agent and the tests needing the dev server's ``/_dev/`` controls skip;
otherwise one dev server subprocess (devconsul.testing.DevConsul) serves the session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from consul_contract_support import Target, unique

from devconsul.testing import DevConsul


@pytest.fixture(scope="session")
def target() -> Iterator[Target]:
    addr = os.environ.get("CONSUL_HTTP_ADDR", "")
    if addr:
        addr = addr.split("://", 1)[-1]
        t = Target(address=addr)
        t.node = t.client().agent.self()["Config"]["NodeName"]
        yield t
        return
    with DevConsul() as dev:
        t = Target(address=dev.address, dev=dev)
        t.node = dev.node_name
        yield t


@pytest.fixture
def c(target: Target) -> Any:
    """A python-consul2 client with a short timeout for ordinary calls."""
    return target.client(timeout=10)


@pytest.fixture
def prefix(c: Any) -> Iterator[str]:
    """A KV prefix of this test's own, deleted afterwards."""
    p = unique("contract") + "/"
    yield p
    c.kv.delete(p, recurse=True)


@pytest.fixture
def sessions(c: Any) -> Iterator[list[str]]:
    """Append session ids here: they are destroyed after the test."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        c.session.destroy(sid)


@pytest.fixture
def services(c: Any) -> Iterator[list[str]]:
    """Append service ids registered on the target's node: deregistered afterwards."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        c.agent.service.deregister(sid)
    c.agent.maintenance(False)


@pytest.fixture
def dev(target: Target) -> DevConsul:
    if target.dev is None:
        pytest.skip("needs the dev server's /_dev/ control API")
    return target.dev


@pytest.fixture
def own_dev(tmp_path: Any) -> Iterator[DevConsul]:
    """A dev server of the test's own (for restarts, faults, clock steps)."""
    if os.environ.get("CONSUL_HTTP_ADDR"):
        pytest.skip("dev-server-only test")
    with DevConsul(tmp_path / "devconsul") as d:
        yield d


def pytest_configure(config: pytest.Config) -> None:
    # python-consul2 warns about legacy APIs on every Consul() construction: noise, not news.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:consul.base")
