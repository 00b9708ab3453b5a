"""The [http] section: off unless set, host:port validated with the file, section and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.errors import ConfigError
from worker.config import load_config

BASE = '[agent]\nnode = "n1"\n[jobs.a]\nschedule = "@every 1m"\ncommand = ["/bin/true"]\n'


def write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(BASE + extra)
    return path


def test_http_is_disabled_by_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}).http.listen is None


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:9464", "127.0.0.1", 9464),
    ("0.0.0.0:0", "0.0.0.0", 0),
    ("[::1]:9464", "::1", 9464),
])
def test_http_listen_is_parsed(tmp_path: Path, listen: str, host: str, port: int) -> None:
    http = load_config(write(tmp_path, f'[http]\nlisten = "{listen}"\n'), env={}).http
    assert (http.listen, http.host, http.port) == (listen, host, port)


@pytest.mark.parametrize("listen", ["9464", "localhost", "127.0.0.1:http", "1.2.3.4:70000"])
def test_bad_listen_is_refused_naming_the_key(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError, match=r"\[http\] listen"):
        load_config(write(tmp_path, f'[http]\nlisten = "{listen}"\n'), env={})


def test_unknown_http_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[http\] port: unknown key"):
        load_config(write(tmp_path, "[http]\nport = 9464\n"), env={})
