"""`cronsul import-crontab`: conversions and refusals, each with its reason."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from scheduler.runs import check_job_name
from worker.crontab import convert, host_zone, import_crontab

def named(jobs: dict[str, Any], word: str) -> Any:
    """The one job whose name is cron-<word>-<6 hex>."""
    [name] = [n for n in jobs if n.rsplit("-", 1)[0] == f"cron-{word}"]
    return jobs[name]


CRONTAB = r"""
# nightly stuff
MAILTO=ops@example.com
CRON_TZ=Europe/Berlin
PATH=/usr/local/bin:/usr/bin:/bin
*/5 * * * * /usr/local/bin/sync-orders --since 10m
@daily /opt/backup.sh > /var/log/backup.log 2>&1
@reboot /opt/start.sh
0 3 * * * mail -s report ops%body line
0 4 * * * date +\%s >> /tmp/stamps
"""


def test_jobs_are_converted_to_valid_toml() -> None:
    result = convert(CRONTAB, source="crontab")
    data = tomllib.loads("\n".join(result.toml))
    jobs = data["jobs"]
    assert sorted(name.rsplit("-", 1)[0] for name in jobs) == [
        "cron-backup-sh", "cron-date", "cron-sync-orders"]
    sync = named(jobs, "sync-orders")
    assert sync["schedule"] == "*/5 * * * *"
    assert sync["timezone"] == "Europe/Berlin"
    assert sync["command"] == ["/bin/sh", "-c", "/usr/local/bin/sync-orders --since 10m"]
    assert sync["env"] == {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    assert named(jobs, "date")["command"][2] == "date +%s >> /tmp/stamps"
    assert not result.errors


def test_reboot_and_percent_stdin_are_refused_with_reasons() -> None:
    result = convert(CRONTAB, source="crontab")
    warnings = "\n".join(result.warnings)
    assert "crontab:8: @reboot refused" in warnings
    assert "crontab:9: unescaped % refused" in warnings and "printf" in warnings
    assert "MAILTO ignored" in warnings
    assert "#   @reboot /opt/start.sh" in "\n".join(result.toml)


def test_system_crontab_user_column_becomes_the_jobs_user() -> None:
    result = convert("17 * * * * root cd / && run-parts --report /etc/cron.hourly\n"
                     "*/5 * * * * www-data php /var/www/cron.php\n",
                     system=True, source="/etc/crontab")
    jobs = tomllib.loads("\n".join(result.toml))["jobs"]
    root, www = named(jobs, "cd"), named(jobs, "php")
    assert root["command"][2].startswith("cd / &&")
    # Root as cron ran it: a root agent refuses a job as root without allow_root.
    assert (root["user"], root["allow_root"]) == ("root", True)
    assert www["user"] == "www-data" and "allow_root" not in www
    [warning] = [w for w in result.warnings if "user column" in w]
    assert "must run as root" in warning


def test_cron_tz_is_the_zone_even_utc_and_tz_only_the_environment() -> None:
    """cronie schedules by CRON_TZ (else its host's local time); TZ only reaches the job."""
    jobs = tomllib.loads("\n".join(convert(
        "CRON_TZ=UTC\n0 8 * * * /bin/true\n").toml))["jobs"]
    assert named(jobs, "true")["timezone"] == "UTC"  # not left to [agent] timezone
    result = convert("TZ=Asia/Kolkata\n0 7 * * * date\n")
    job = named(tomllib.loads("\n".join(result.toml))["jobs"], "date")
    assert "timezone" not in job and job["env"] == {"TZ": "Asia/Kolkata"}
    assert [w for w in result.warnings if "no CRON_TZ line" in w]


def test_invalid_lines_are_errors_naming_the_line() -> None:
    result = convert("61 * * * * /bin/true\n* * * /bin/false\n", source="tab")
    assert any(e.startswith("tab:1:") for e in result.errors)
    assert any(e.startswith("tab:2:") and "5 time fields" in e for e in result.errors)


def test_a_crontab_without_a_time_zone_is_warned_about_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Classic cron ran it in its host's local time; cronsul would take [agent] timezone."""
    monkeypatch.setenv("TZ", "America/New_York")
    result = convert("*/5 * * * * /usr/bin/a\n0 1 * * * /usr/bin/b\n", source="crontab")
    zone = [w for w in result.warnings if "no CRON_TZ line" in w]
    assert len(zone) == 1 and "America/New_York" in zone[0], result.warnings
    assert "timezone" not in "\n".join(result.toml).replace("# converted", "")
    assert not [w for w in convert(CRONTAB).warnings if "no CRON_TZ" in w]


def test_host_zone_reads_tz_then_the_localtime_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TZ", raising=False)
    zoneinfo = tmp_path / "usr/share/zoneinfo/Europe"
    zoneinfo.mkdir(parents=True)
    (zoneinfo / "Berlin").write_bytes(b"TZif")
    link = tmp_path / "localtime"
    link.symlink_to(zoneinfo / "Berlin")
    assert host_zone(link) == "Europe/Berlin"
    assert host_zone(tmp_path / "missing") == "unknown"
    monkeypatch.setenv("TZ", ":Asia/Tokyo")
    assert host_zone(link) == "Asia/Tokyo"


def test_cronie_dash_prefix_is_dropped() -> None:
    """cronie's "-" before the times only turns off syslogging of the job."""
    jobs = tomllib.loads("\n".join(convert("-*/10 * * * * /usr/bin/quiet\n").toml))["jobs"]
    assert named(jobs, "quiet")["schedule"] == "*/10 * * * *"


def test_a_system_crontab_path_reads_the_user_column(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from worker.crontab import import_crontab, is_system_crontab

    assert is_system_crontab("/etc/crontab") and is_system_crontab("/etc/cron.d/backup")
    assert not is_system_crontab(str(tmp_path / "crontab")) and not is_system_crontab("-")
    user_tab = tmp_path / "mine"
    user_tab.write_text("0 1 * * * root-cause --fix\n")  # a user crontab: no user column
    assert import_crontab(str(user_tab), system=False, prefix="cron") == 0
    job = named(tomllib.loads(capsys.readouterr().out)["jobs"], "root-cause")
    assert job["command"][2] == "root-cause --fix" and "user" not in job


def test_names_survive_an_edit_elsewhere_in_the_crontab() -> None:
    """A job's name keys its cursor, history and pause: re-importing a crontab with a line
    added at the top must not rename the jobs below it (it did, with line numbers in names)."""
    before = tomllib.loads("\n".join(convert(
        "0 1 * * * /opt/a.sh\n0 2 * * * /opt/b.sh\n0 3 * * * /opt/b.sh\n").toml))["jobs"]
    after = tomllib.loads("\n".join(convert(
        "MAILTO=x\n*/5 * * * * /opt/new.sh\n0 1 * * * /opt/a.sh\n0 2 * * * /opt/b.sh\n"
        "30 3 * * * /opt/b.sh\n").toml))["jobs"]
    assert set(before) <= set(after)  # the same command keeps its name, schedule edits too
    assert len(set(after) - set(before)) == 1
    b1, b2 = sorted(n for n in after if n.startswith("cron-b-sh-"))
    assert b2 == b1 + "-2"  # the same command twice: told apart in file order
    other_user = convert("0 1 * * * alice /opt/a.sh\n0 1 * * * bob /opt/a.sh\n", system=True)
    assert len(set(tomllib.loads("\n".join(other_user.toml))["jobs"])) == 2


def test_long_command_words_and_prefixes_still_make_valid_names(
        capsys: pytest.CaptureFixture[str]) -> None:
    long_word = "/opt/" + "x" * 150 + " --run"
    jobs = tomllib.loads("\n".join(convert(f"0 1 * * * {long_word}\n0 2 * * * {long_word}\n",
                                            prefix="p" * 80).toml))["jobs"]
    assert len(jobs) == 2
    for name in jobs:
        assert check_job_name(name) == name and len(name) <= 100
    assert import_crontab("-", system=False, prefix="p" * 81) == 2
    assert "--prefix" in capsys.readouterr().err
    assert import_crontab("-", system=False, prefix="bad/prefix") == 2
