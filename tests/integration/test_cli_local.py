"""`cronsul run JOB --local` for a callable job: run here in a warm worker process of its own,
as the agent would run it (keyword arguments, output, timeout), never a traceback or a hang.
The callables are in tests/pyjobs_fixture.py (on sys.path, which the worker inherits)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cronsul_testing import render_config

from worker.cli import main


def write(tmp_path: Path, job: dict[str, Any]) -> str:
    path = tmp_path / "cronsul.toml"
    path.write_text(render_config({"agent": {"node": "n1"}},
                                  {"j": {"schedule": "@daily", "allow_root": True, **job}}))
    return str(path)


def test_a_callable_runs_here_with_its_params_and_output(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, {"callable": "pyjobs_fixture:add",
                           "params": [{"a": "1", "b": "2"}]})
    assert main(["run", "j", "--local", "-c", cfg, "--param", "a=40", "--param", "b=2"]) == 0
    out, err = capfd.readouterr()
    assert "adding 40 and 2" in out
    assert "exit_code=0" in err and "Traceback" not in err


def test_a_failing_callable_exits_1_with_its_error(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, {"callable": "pyjobs_fixture:fail"})
    assert main(["run", "j", "--local", "-c", cfg]) == 1
    out, err = capfd.readouterr()
    assert "bad thing: boom" in out + err


def test_a_callable_past_its_timeout_is_killed(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, {"callable": "pyjobs_fixture:sleep", "timeout": "1s",
                           "params": [{"seconds": "60"}]})
    began = time.monotonic()
    assert main(["run", "j", "--local", "-c", cfg, "--param", "seconds=60"]) == 1
    assert time.monotonic() - began < 20
    assert "timed_out=yes" in capfd.readouterr().err


def test_an_unknown_callable_is_a_failed_run_not_a_traceback(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path, {"callable": "no_such_module_here:f"})
    assert main(["run", "j", "--local", "-c", cfg]) == 1
    out, err = capfd.readouterr()
    assert "no_such_module_here" in out + err
    assert "Exception in callback" not in err
