from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cronsul_testing import RedisServer, redis_server


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests isolate themselves with key prefixes/flush."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_client(redis_proc: RedisServer) -> Iterator[redis.Redis]:
    client = redis_proc.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
