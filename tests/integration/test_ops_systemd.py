"""The systemd unit passes `systemd-analyze verify`; the sysusers/tmpfiles snippets apply; every
directive is commented; the settings the agent relies on are there.

`systemd-analyze verify` also checks that ExecStart's (and ExecReload's) binary exists. The
unit names the production path (/opt/cronsul/venv/bin/cronsul), so the test verifies a
temporary copy whose ExecStart and ExecReload point at this checkout's `cronsul` entry point (or,
failing that, the Python running the tests); nothing else is changed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from cronsul_testing import REPO, require_binary

from scheduler.durations import parse_duration

UNIT = REPO / "systemd" / "cronsul.service"
PROD_EXEC = "/opt/cronsul/venv/bin/cronsul"


def systemd_tool(name: str) -> str:
    """The binary, installing Debian's `systemd` package when we are root and may."""
    return require_binary(name, "systemd")


def directives(text: str) -> list[tuple[int, str, str]]:
    out = []
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.append((i, m.group(1), m.group(2)))
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    entry = Path(sys.executable).parent / "cronsul"
    exe = str(entry if entry.exists() else Path(sys.executable))
    text = UNIT.read_text()
    assert f"ExecStart={PROD_EXEC} " in text
    copy = tmp_path / "cronsul.service"
    copy.write_text(text.replace(f"ExecStart={PROD_EXEC} ", f"ExecStart={exe} ")
                    .replace(f"ExecReload={PROD_EXEC} ", f"ExecReload={exe} "))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cronsul.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_sysusers_and_tmpfiles_snippets_apply(tmp_path: Path) -> None:
    sysusers = systemd_tool("systemd-sysusers")
    tmpfiles = systemd_tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={root}", str(REPO / "systemd/cronsul.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^cronsul:x:\d+:\d+:.*:/var/lib/cronsul:/usr/sbin/nologin$", passwd, re.M)
    subprocess.run([tmpfiles, f"--root={root}", "--create",
                    str(REPO / "systemd/cronsul.tmpfiles.conf")],
                   check=True, capture_output=True, timeout=60)
    assert (root / "etc/cronsul").is_dir() and (root / "var/lib/cronsul").is_dir()
    assert oct((root / "etc/cronsul").stat().st_mode & 0o777) == "0o750"


def test_every_directive_is_commented() -> None:
    lines = UNIT.read_text().splitlines()
    for i, key, _ in directives(UNIT.read_text()):
        assert i > 0 and lines[i - 1].startswith("#"), f"{key}= (line {i + 1}) has no comment"


def test_the_settings_the_agent_relies_on() -> None:
    d = {key: value for _, key, value in directives(UNIT.read_text())}
    assert d["Type"] == "notify" and d["NotifyAccess"] == "main"
    assert parse_duration(d["WatchdogSec"] + "s") >= timedelta(seconds=10)
    assert d["Restart"] == "on-failure" and d["RestartPreventExitStatus"] == "2"
    reloads = [value for _, key, value in directives(UNIT.read_text()) if key == "ExecReload"]
    assert reloads == ["/opt/cronsul/venv/bin/cronsul check --quiet -c /etc/cronsul/cronsul.toml",
                       "/bin/kill -HUP $MAINPID"]  # a bad file fails `systemctl reload`
    assert d["EnvironmentFile"] == "-/etc/default/cronsul"
    assert d["User"] == "cronsul" and d["NoNewPrivileges"] == "yes"
    # Longer than the default shutdown_grace (30 s) plus kill_grace (10 s).
    assert parse_duration(d["TimeoutStopSec"] + "s") > timedelta(seconds=40)
    # Longer than the 30 s startup retry before READY=1.
    assert parse_duration(d["TimeoutStartSec"] + "s") > timedelta(seconds=30)
