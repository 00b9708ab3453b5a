"""An agent running as root never runs a job as root unless the job says allow_root = true.

The end-to-end version (a real agent records the refusal, a ``user = "nobody"`` job runs as
nobody) is in tests/integration/test_redis_tls.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cronsul_testing import render_config

from worker.cli import main
from worker.executor import Execution, root_refusal

ROOT, USER = 0, 1000


@pytest.mark.parametrize(("user", "allow_root", "callable_job", "euid", "refused"), [
    (None, False, False, ROOT, "refused to run as root"),
    ("root", False, False, ROOT, "refused to run as root"),
    (None, True, False, ROOT, None),
    ("root", True, False, ROOT, None),
    ("nobody", False, False, ROOT, None),
    (None, False, False, USER, None),  # an unprivileged agent runs jobs as itself
    ("no-such-user-xyz", False, False, ROOT, None),  # refused later: unknown user
    (None, False, True, ROOT, "callable jobs run as the agent's user"),
    (None, True, True, ROOT, None),
    ("nobody", True, True, ROOT, "cannot switch to user 'nobody'"),
    (None, False, True, USER, None),
])
def test_root_refusal(user: str | None, allow_root: bool, callable_job: bool, euid: int,
                      refused: str | None) -> None:
    why = root_refusal(user, allow_root, callable_job, euid)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs to run as root")


def write(tmp_path: Path, job: dict[str, Any]) -> str:
    path = tmp_path / "cronsul.toml"
    body = {"schedule": "@daily", "timeout": "10s", **job}
    path.write_text(render_config({"agent": {"node": "n1"}}, {"j": body}))
    return str(path)


@needs_root
def test_run_local_refuses_a_job_without_user_or_allow_root(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"
    cfg = write(tmp_path, {"allow_root": False, "command": ["/usr/bin/touch", str(marker)]})
    assert main(["run", "j", "--local", "-c", cfg]) == 1
    assert "refused to run as root" in capfd.readouterr().err
    assert not marker.exists()


@needs_root
def test_run_local_runs_as_the_jobs_user(tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, {"user": "nobody",
                           "command": ["/bin/sh", "-c", "echo $(id -u) $(id -un)"]})
    assert main(["run", "j", "--local", "-c", cfg]) == 0
    assert capfd.readouterr().out.strip() == "65534 nobody"


@needs_root
def test_allow_root_runs_as_root(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, {"allow_root": True, "command": ["/usr/bin/id", "-u"]})
    assert main(["run", "j", "--local", "-c", cfg]) == 0
    assert capfd.readouterr().out.strip() == "0"


@needs_root
def test_execution_drops_to_user_without_supplementary_groups() -> None:
    out = Execution(None, 1).run(["/usr/bin/id"], {"PATH": "/usr/bin:/bin"}, "/", 5,
                                 user="nobody")
    assert out.ok, out
    assert out.output.startswith("uid=65534(nobody) gid=65534(nogroup)")
    assert "groups=65534(nogroup)" in out.output and "root" not in out.output
