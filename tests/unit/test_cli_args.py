"""CLI arguments a user gets wrong, and a reader that goes away: a clear refusal (exit 2) or a
quiet stop, never a traceback or a command that computes for minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cronsul_testing import REPO

from worker.cli import main

JOBS = "".join(f'[jobs.j{i}]\nschedule = "* * * * * *"\ncommand = ["true"]\n' for i in range(20))


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    path = tmp_path / "c.toml"
    path.write_text(JOBS)
    return str(path)


@pytest.mark.parametrize("value", ["0", "-1", "1001", "100000000", "abc", "1.5"])
@pytest.mark.parametrize("command", [["check"], ["next", "j0"]])
def test_fire_time_counts_out_of_range_are_refused(
        cfg: str, command: list[str], value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "-c", cfg, "-n", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument -n:" in err and value in err and "_positive" not in err, err


@pytest.mark.parametrize("command", [["history", "j0"], ["dlq", "list"]])
def test_listing_counts_out_of_range_are_refused(
        cfg: str, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "-c", cfg, "-n", "0"])
    assert exit_.value.code == 2
    assert "between 1 and 10000" in capsys.readouterr().err


def test_the_largest_count_is_served(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["next", "j0", "-c", cfg, "-n", "1000"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1000


def test_a_reader_that_goes_away_is_not_a_traceback(cfg: str) -> None:
    """`cronsul check --json | head -1`: about 1 MB of output, the reader closes after a line."""
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "check", "-c", cfg, "-n",
                             "1000", "--json"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_next_from_a_date_in_the_jobs_zone_shows_a_dst_day(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dst.toml"
    path.write_text('[jobs.b]\nschedule = "30 2 * * *"\ntimezone = "Europe/Berlin"\n'
                    'command = ["true"]\n[jobs.j]\nschedule = "*/15 * * * *"\n'
                    'jitter = "5m"\ncommand = ["true"]\n')
    assert main(["next", "b", "-c", str(path), "-n", "3", "--from", "2027-03-27"]) == 0
    # 02:30 does not exist on 2027-03-28 in Berlin: it runs once, at the end of the gap.
    assert capsys.readouterr().out.splitlines() == [
        "2027-03-27T02:30:00+01:00  (2027-03-27T01:30:00Z)",
        "2027-03-28T03:00:00+02:00  (2027-03-28T01:00:00Z)",
        "2027-03-29T02:30:00+02:00  (2027-03-29T00:30:00Z)"]
    # A time with an offset is that instant; with jitter, the fire time is shown too (it is a
    # function of the job and the tick, the same on every node).
    assert main(["next", "j", "-c", str(path), "-n", "1", "--from", "2027-03-28T00:00Z",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["next"] == ["2027-03-28T00:00:00Z"]
    assert out["fires"][0] > out["next"][0]


def test_next_from_refuses_what_is_not_a_time(cfg: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["next", "j0", "-c", cfg, "--from", "yesterday"])
    assert exit_.value.code == 2
    assert "argument --from: 'yesterday' is not an ISO 8601 time" in capsys.readouterr().err


def test_check_warns_that_env_values_are_not_expanded(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[jobs.j]\nschedule = "@daily"\ncommand = ["true"]\n'
                    'env = { PATH = "$PATH:/opt/bin", MODE = "full" }\n')
    assert main(["check", "--quiet", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "env PATH = '$PATH:/opt/bin' is used as written" in err and "MODE" not in err
