from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devconsul.testing import DevConsul


@pytest.fixture
def devconsul(tmp_path: Path) -> Iterator[DevConsul]:
    server = DevConsul(data_dir=tmp_path / "consul-data")
    try:
        yield server
    finally:
        server.close()
