"""The dashboard's pure parts: the admin token config key, sessions and CSRF, escaping."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.errors import ConfigError
from worker.config import load_config
from worker.dashboard.auth import Auth, same_origin
from worker.dashboard.markup import Safe, esc, html, url

TOKEN = "0123456789abcdef-token"


def _config(tmp_path: Path, token_line: str) -> Path:
    path = tmp_path / "cronsul.toml"
    path.write_text(f'[agent]\nnode = "n1"\n[http]\nlisten = "127.0.0.1:9464"\n{token_line}\n')
    return path


def _token(tmp_path: Path, mode: int, text: str = TOKEN) -> Path:
    f = tmp_path / "admin.token"
    f.write_text(text + "\n")
    f.chmod(mode)
    return f


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_admin_token_file_private_is_read(tmp_path: Path, mode: int) -> None:
    _token(tmp_path, mode)
    cfg = load_config(_config(tmp_path, 'admin_token_file = "admin.token"'), env={})
    assert cfg.http.admin_token == TOKEN and TOKEN not in repr(cfg.http)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_admin_token_file_others_may_access_is_refused(tmp_path: Path, mode: int) -> None:
    token = _token(tmp_path, mode)
    with pytest.raises(ConfigError, match=r"\[http\] admin_token_file.*other users.*chmod"):
        load_config(_config(tmp_path, f'admin_token_file = "{token}"'), env={})


def test_admin_token_file_short_or_missing_is_refused(tmp_path: Path) -> None:
    _token(tmp_path, 0o600, "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_config(_config(tmp_path, 'admin_token_file = "admin.token"'), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(_config(tmp_path, 'admin_token_file = "/nonexistent/token"'), env={})


def test_no_token_file_means_actions_off(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, ""), env={})
    assert cfg.http.admin_token is None and not Auth(None).enabled
    assert Auth(None).session({"Authorization": f"Bearer {TOKEN}"}) is None


def test_session_cookie_round_trip_and_tampering() -> None:
    auth = Auth(TOKEN)
    cookie = auth.new_session("alice", now=1000.0)
    s = auth.session({"Cookie": f"cronsul_session={cookie}"}, now=1001.0)
    assert s is not None and s.who == "alice" and s.via == "session"
    assert auth.session({"Cookie": f"cronsul_session={cookie}"}, now=1000.0 + 13 * 3600) is None
    head, _, mac = cookie.rpartition(".")
    forged = head.replace("YWxpY2U", "Ym9i") + "." + mac  # alice -> bob, same MAC
    assert auth.session({"Cookie": f"cronsul_session={forged}"}, now=1001.0) is None
    assert Auth(TOKEN + "x").session({"Cookie": f"cronsul_session={cookie}"},
                                     now=1001.0) is None  # token rotated: sessions die
    assert auth.new_session("<script>", now=1.0).split(".")[3] == "YWRtaW4"  # "admin"


def test_csrf_is_per_session() -> None:
    auth = Auth(TOKEN)
    a = auth.session({"Cookie": "cronsul_session=" + auth.new_session("a")})
    b = auth.session({"Cookie": "cronsul_session=" + auth.new_session("b")})
    assert a is not None and b is not None
    assert auth.csrf_ok(a, auth.csrf(a)) and not auth.csrf_ok(a, auth.csrf(b))
    assert not auth.csrf_ok(a, "")
    bearer = auth.session({"Authorization": f"Bearer {TOKEN}"})
    assert bearer is not None and auth.csrf_ok(bearer, "")


@pytest.mark.parametrize(("headers", "required", "ok"), [
    ({"Host": "h:1", "Origin": "http://h:1"}, True, True),
    ({"Host": "h:1", "Origin": "http://evil:1"}, True, False),
    ({"Host": "h:1", "Referer": "http://h:1/jobs"}, True, True),
    ({"Host": "h:1", "Referer": "http://evil/jobs"}, True, False),
    ({"Host": "h:1"}, True, False),
    ({"Host": "h:1"}, False, True),
    ({"Host": "h:1", "Origin": "null"}, True, False),
])
def test_same_origin(headers: dict[str, str], required: bool, ok: bool) -> None:
    assert same_origin(headers, required) is ok


def test_markup_escapes_values_not_safe_markup() -> None:
    assert esc('<a href="x">&') == "&lt;a href=&quot;x&quot;&gt;&amp;"
    assert html("<td>{v}</td>", v="<script>") == "<td>&lt;script&gt;</td>"
    assert html("<td>{v}</td>", v=Safe("<b>ok</b>")) == "<td><b>ok</b></td>"
    assert url("runs", "job@1#ab") == "/runs/job%401%23ab"

